//! Invalid documents: each is refused, and the error names the right field (and line).

use weft_api::parse::parse_documents;

const DP_HEAD: &str =
    "type: Dataplane\nmesh: default\nname: dp-1\nnetworking:\n  address: 10.0.0.1\n";

/// (description, document, expected field path, expected line or 0 for "any").
fn cases() -> Vec<(&'static str, String, &'static str, usize)> {
    let dp = |rest: &str| format!("{DP_HEAD}{rest}");
    vec![
        ("unknown type", "type: Meshh\nname: a\n".into(), "type", 1),
        ("missing type", "name: a\n".into(), "type", 0),
        ("unknown top-level field", "type: Mesh\nname: a\nmtsl: {}\n".into(), "mtsl", 3),
        ("nested unknown field", "type: Mesh\nname: a\nmtls:\n  enabledBackend: x\n  backends:\n  - name: x\n    type: builtin\n    tpye: y\n".into(), "mtls.backends[0].tpye", 8),
        ("upper-case name", "type: Mesh\nname: Payments\n".into(), "name", 2),
        ("mesh name too long", format!("type: Mesh\nname: {}\n", "a".repeat(64)), "name", 2),
        ("mesh on a Mesh", "type: Mesh\nname: a\nmesh: b\n".into(), "mesh", 3),
        ("missing mesh", "type: Dataplane\nname: a\nnetworking: {address: 1.2.3.4, inbound: [{port: 1, tags: {kuma.io/service: a}}]}\n".into(), "mesh", 0),
        ("enabledBackend names nothing", "type: Mesh\nname: a\nmtls:\n  enabledBackend: ca-2\n  backends:\n  - {name: ca-1, type: builtin}\n".into(), "mtls.enabledBackend", 4),
        ("bad CA type", "type: Mesh\nname: a\nmtls:\n  backends:\n  - {name: ca-1, type: vault}\n".into(), "mtls.backends[0].type", 0),
        ("bad mode", "type: Mesh\nname: a\nmtls:\n  backends:\n  - {name: ca-1, type: builtin, mode: LAX}\n".into(), "mtls.backends[0].mode", 0),
        ("bad dpCert duration", "type: Mesh\nname: a\nmtls:\n  backends:\n  - name: ca-1\n    type: builtin\n    dpCert:\n      rotation:\n        expiration: 1 fortnight\n".into(), "mtls.backends[0].dpCert.rotation.expiration", 9),
        ("dpCert lifetime past 100 years", "type: Mesh\nname: a\nmtls:\n  backends:\n  - name: ca-1\n    type: builtin\n    dpCert:\n      rotation:\n        expiration: 876001h\n".into(), "mtls.backends[0].dpCert.rotation.expiration", 9),
        ("CA lifetime past 100 years", "type: Mesh\nname: a\nmtls:\n  backends:\n  - name: ca-1\n    type: builtin\n    conf:\n      caCert:\n        expiration: 70080000h\n".into(), "mtls.backends[0].conf.caCert.expiration", 9),
        ("MTP from by a tag other than the service", "type: MeshTrafficPermission\nmesh: m\nname: p\nspec:\n  targetRef: {kind: Mesh}\n  from:\n  - targetRef: {kind: MeshSubset, tags: {kuma.io/service: web, version: v1}}\n    default: {action: Deny}\n".into(), "spec.from[0].targetRef.tags.version", 0),
        ("TrafficPermission source by a tag other than the service", "type: TrafficPermission\nmesh: m\nname: p\nsources:\n- match: {kuma.io/service: web, version: v1}\ndestinations:\n- match: {kuma.io/service: backend}\n".into(), "sources[0].match.version", 0),
        ("TrafficPermission source without a service", "type: TrafficPermission\nmesh: m\nname: p\nsources:\n- match: {env: prod}\ndestinations:\n- match: {kuma.io/service: backend}\n".into(), "sources[0].match", 0),
        ("explicit inbound on another address", dp("  inbound:\n  - port: 8080\n    address: 10.0.0.2\n    tags: {kuma.io/service: web}\n"), "networking.inbound[0].address", 0),
        ("outbound by a tag other than the service", dp("  inbound:\n  - port: 8080\n    tags: {kuma.io/service: web}\n  outbound:\n  - port: 10001\n    tags: {kuma.io/service: backend, version: v1}\n"), "networking.outbound[0].tags.version", 0),
        ("TrafficRoute destination by a tag other than the service", "type: TrafficRoute\nmesh: m\nname: r\nsources:\n- match: {kuma.io/service: web}\ndestinations:\n- match: {kuma.io/service: backend, version: v1}\nconf:\n  destination: {kuma.io/service: backend}\n".into(), "destinations[0].match.version", 0),
        ("explicit inbound whose app is its own listener", dp("  inbound:\n  - port: 8080\n    serviceAddress: 10.0.0.1\n    tags: {kuma.io/service: web}\n"), "networking.inbound[0].servicePort", 0),
        ("provided CA without key", "type: Mesh\nname: a\nmtls:\n  backends:\n  - name: ca-1\n    type: provided\n    conf:\n      cert: {inlineString: x}\n".into(), "mtls.backends[0].conf.key", 0),
        ("provided CA with two sources", "type: Mesh\nname: a\nmtls:\n  backends:\n  - name: ca-1\n    type: provided\n    conf:\n      cert: {inlineString: x, file: /x}\n      key: {file: /k}\n".into(), "mtls.backends[0].conf.cert", 8),
        ("passthrough not a bool", "type: Mesh\nname: a\nnetworking:\n  outbound:\n    passthrough: maybe\n".into(), "networking.outbound.passthrough", 5),
        ("metrics port out of range", "type: Mesh\nname: a\nmetrics:\n  enabledBackend: p\n  backends:\n  - name: p\n    type: prometheus\n    conf: {port: 70000}\n".into(), "metrics.backends[0].conf.port", 8),
        ("sampling over 100", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: z\n    type: zipkin\n    sampling: 150\n    conf: {url: 'http://z:9411/api/v2/spans'}\n".into(), "tracing.backends[0].sampling", 7),
        ("zipkin over https", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: z\n    type: zipkin\n    conf: {url: 'https://z:9411/api/v2/spans'}\n".into(), "tracing.backends[0].conf.url", 7),
        ("zipkin without scheme", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: z\n    type: zipkin\n    conf: {url: 'z:9411'}\n".into(), "tracing.backends[0].conf.url", 7),
        ("otel without port", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: o\n    type: opentelemetry\n    conf: {endpoint: collector}\n".into(), "tracing.backends[0].conf.endpoint", 7),
        ("otel bad port", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: o\n    type: opentelemetry\n    conf: {endpoint: 'collector:99999'}\n".into(), "tracing.backends[0].conf.endpoint", 7),
        ("otel IPv6 without port", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: o\n    type: opentelemetry\n    conf: {endpoint: '[fd00::5]'}\n".into(), "tracing.backends[0].conf.endpoint", 7),
        ("otel with a path", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: o\n    type: opentelemetry\n    conf: {endpoint: 'collector:4317/v1'}\n".into(), "tracing.backends[0].conf.endpoint", 7),
        ("otel over grpcs", "type: Mesh\nname: a\ntracing:\n  backends:\n  - name: o\n    type: opentelemetry\n    conf: {endpoint: 'grpcs://collector:4317'}\n".into(), "tracing.backends[0].conf.endpoint", 7),
        ("otel without endpoint", "type: Mesh\nname: a\ntracing:\n  backends:\n  - {name: o, type: opentelemetry}\n".into(), "tracing.backends[0].conf.endpoint", 0),
        ("tcp log without port", "type: Mesh\nname: a\nlogging:\n  backends:\n  - {name: t, type: tcp, conf: {address: logs}}\n".into(), "logging.backends[0].conf.address", 0),
        ("dataplane without inbound", dp(""), "networking.inbound", 0),
        ("service name with a slash", dp("  inbound:\n  - port: 8080\n    tags: {kuma.io/service: api/v1}\n"), "networking.inbound[0].tags.kuma.io/service", 0),
        ("inbound port zero", dp("  inbound:\n  - port: 0\n    tags: {kuma.io/service: a}\n"), "networking.inbound[0].port", 7),
        ("inbound port too big", dp("  inbound:\n  - port: 65536\n    tags: {kuma.io/service: a}\n"), "networking.inbound[0].port", 7),
        ("servicePort too big", dp("  inbound:\n  - port: 80\n    servicePort: 99999\n    tags: {kuma.io/service: a}\n"), "networking.inbound[0].servicePort", 8),
        ("missing service tag", dp("  inbound:\n  - port: 80\n    tags: {version: v1}\n"), "networking.inbound[0].tags.kuma.io/service", 0),
        ("bad protocol", dp("  inbound:\n  - port: 80\n    tags: {kuma.io/service: a, kuma.io/protocol: smtp}\n"), "networking.inbound[0].tags.kuma.io/protocol", 0),
        ("duplicate ports", dp("  inbound:\n  - port: 80\n    tags: {kuma.io/service: a}\n  - port: 80\n    tags: {kuma.io/service: b}\n"), "networking.inbound[1].port", 9),
        ("bad serviceAddress", dp("  inbound:\n  - port: 80\n    serviceAddress: localhost:80\n    tags: {kuma.io/service: a}\n"), "networking.inbound[0].serviceAddress", 8),
        ("port as string", dp("  inbound:\n  - port: eighty\n    tags: {kuma.io/service: a}\n"), "networking.inbound[0].port", 7),
        ("outbound without service", dp("  inbound:\n  - port: 80\n    tags: {kuma.io/service: a}\n  outbound:\n  - port: 10001\n    tags: {}\n"), "networking.outbound[0].tags.kuma.io/service", 0),
        ("permission without sources", "type: TrafficPermission\nmesh: default\nname: p\nsources: []\ndestinations: [{match: {kuma.io/service: b}}]\n".into(), "sources", 4),
        ("route without destination", "type: TrafficRoute\nmesh: default\nname: r\nsources: [{match: {kuma.io/service: a}}]\ndestinations: [{match: {kuma.io/service: b}}]\nconf: {}\n".into(), "conf", 6),
        ("all-zero split", "type: TrafficRoute\nmesh: default\nname: r\nsources: [{match: {kuma.io/service: a}}]\ndestinations: [{match: {kuma.io/service: b}}]\nconf:\n  split:\n  - weight: 0\n    destination: {kuma.io/service: b}\n".into(), "conf.split", 7),
        ("negative weight", "type: TrafficRoute\nmesh: default\nname: r\nsources: [{match: {kuma.io/service: a}}]\ndestinations: [{match: {kuma.io/service: b}}]\nconf:\n  split:\n  - weight: -1\n    destination: {kuma.io/service: b}\n".into(), "conf.split[0].weight", 8),
        ("bad regex", "type: TrafficRoute\nmesh: default\nname: r\nsources: [{match: {kuma.io/service: a}}]\ndestinations: [{match: {kuma.io/service: b}}]\nconf:\n  destination: {kuma.io/service: b}\n  http:\n  - match:\n      path: {regex: '(['}\n    destination: {kuma.io/service: b}\n".into(), "conf.http[0].match.path.regex", 10),
        ("regex method", "type: TrafficRoute\nmesh: default\nname: r\nsources: [{match: {kuma.io/service: a}}]\ndestinations: [{match: {kuma.io/service: b}}]\nconf:\n  destination: {kuma.io/service: b}\n  http:\n  - match:\n      method: {regex: 'P.*'}\n    destination: {kuma.io/service: b}\n".into(), "conf.http[0].match.method", 0),
        ("lower-case method", "type: TrafficRoute\nmesh: default\nname: r\nsources: [{match: {kuma.io/service: a}}]\ndestinations: [{match: {kuma.io/service: b}}]\nconf:\n  destination: {kuma.io/service: b}\n  http:\n  - match:\n      method: {exact: post}\n    destination: {kuma.io/service: b}\n".into(), "conf.http[0].match.method", 0),
        ("two load balancers", "type: TrafficRoute\nmesh: default\nname: r\nsources: [{match: {kuma.io/service: a}}]\ndestinations: [{match: {kuma.io/service: b}}]\nconf:\n  destination: {kuma.io/service: b}\n  loadBalancer: {roundRobin: {}, random: {}}\n".into(), "conf.loadBalancer", 8),
        ("bad action", "type: MeshTrafficPermission\nmesh: default\nname: p\nspec:\n  targetRef: {kind: Mesh}\n  from:\n  - targetRef: {kind: Mesh}\n    default: {action: Maybe}\n".into(), "spec.from[0].default.action", 8),
        ("MeshService without name", "type: MeshTrafficPermission\nmesh: default\nname: p\nspec:\n  targetRef: {kind: MeshService}\n  from:\n  - targetRef: {kind: Mesh}\n    default: {action: Allow}\n".into(), "spec.targetRef.name", 5),
        ("bad targetRef kind", "type: MeshTrafficPermission\nmesh: default\nname: p\nspec:\n  targetRef: {kind: Galaxy}\n  from: []\n".into(), "spec.targetRef.kind", 5),
        ("route path type", "type: MeshHTTPRoute\nmesh: default\nname: r\nspec:\n  targetRef: {kind: Mesh}\n  to:\n  - targetRef: {kind: MeshService, name: b}\n    rules:\n    - matches: [{path: {type: Glob, value: /}}]\n      default: {backendRefs: [{kind: MeshService, name: b}]}\n".into(), "spec.to[0].rules[0].matches[0].path.type", 9),
        ("route sets a connection header", "type: MeshHTTPRoute\nmesh: default\nname: r\nspec:\n  targetRef: {kind: Mesh}\n  to:\n  - targetRef: {kind: MeshService, name: b}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /}}]\n      default:\n        backendRefs: [{kind: MeshService, name: b}]\n        filters:\n        - type: RequestHeaderModifier\n          requestHeaderModifier:\n            set: [{name: Transfer-Encoding, value: gzip}]\n".into(), "spec.to[0].rules[0].default.filters[0].requestHeaderModifier.set[0].name", 0),
        ("route removes host", "type: MeshHTTPRoute\nmesh: default\nname: r\nspec:\n  targetRef: {kind: Mesh}\n  to:\n  - targetRef: {kind: MeshService, name: b}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /}}]\n      default:\n        backendRefs: [{kind: MeshService, name: b}]\n        filters:\n        - type: RequestHeaderModifier\n          requestHeaderModifier:\n            remove: [host]\n".into(), "spec.to[0].rules[0].default.filters[0].requestHeaderModifier.remove[0]", 0),
        ("route adds a bad header name", "type: MeshHTTPRoute\nmesh: default\nname: r\nspec:\n  targetRef: {kind: Mesh}\n  to:\n  - targetRef: {kind: MeshService, name: b}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /}}]\n      default:\n        backendRefs: [{kind: MeshService, name: b}]\n        filters:\n        - type: ResponseHeaderModifier\n          responseHeaderModifier:\n            add: [{name: \"x bad\", value: v}]\n".into(), "spec.to[0].rules[0].default.filters[0].responseHeaderModifier.add[0].name", 0),
        ("route subset without tags", "type: MeshHTTPRoute\nmesh: default\nname: r\nspec:\n  targetRef: {kind: Mesh}\n  to:\n  - targetRef: {kind: MeshService, name: b}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /}}]\n      default:\n        backendRefs:\n        - {kind: MeshServiceSubset, name: b}\n".into(), "spec.to[0].rules[0].default.backendRefs[0].tags", 12),
        ("k8s unknown spec field", "apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: a\nspec:\n  mtlss: {}\n".into(), "spec.mtlss", 6),
        ("k8s bad apiVersion", "apiVersion: v1\nkind: Mesh\nmetadata: {name: a}\n".into(), "apiVersion", 1),
        ("k8s missing name", "apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {}\n".into(), "metadata.name", 3),
        ("k8s bad port", "apiVersion: kuma.io/v1alpha1\nkind: Dataplane\nmesh: default\nmetadata: {name: d}\nspec:\n  networking:\n    address: 1.2.3.4\n    inbound:\n    - port: 0\n      tags: {kuma.io/service: a}\n".into(), "spec.networking.inbound[0].port", 9),
    ]
}

#[test]
fn every_invalid_document_names_its_field() {
    let cases = cases();
    assert!(cases.len() >= 25);
    for (what, doc, field, line) in cases {
        let err = match parse_documents(&doc) {
            Ok(_) => panic!("{what}: accepted\n{doc}"),
            Err(e) => e,
        };
        assert_eq!(err.field.as_deref(), Some(field), "{what}: {err}");
        if line > 0 {
            assert_eq!(err.line, Some(line), "{what}: {err}");
        }
        assert!(
            err.to_string().contains(field),
            "{what}: message does not name the field: {err}"
        );
    }
}

#[test]
fn error_names_the_document_in_a_stream() {
    let err =
        parse_documents("type: Mesh\nname: a\n---\ntype: Mesh\nname: b\nbogus: 1\n").unwrap_err();
    assert_eq!(err.document, 2);
    assert_eq!(err.line, Some(6));
    assert_eq!(err.resource.as_deref(), Some("Mesh/b"));
}

#[test]
fn syntax_errors_do_not_panic() {
    for doc in [
        "type: Mesh\nname: [a\n",
        ":\n  - : -\n",
        "\t\x00",
        "{{{{",
        "a: &x [*x]\n",
        "- - - - -",
    ] {
        assert!(parse_documents(doc).is_err(), "{doc:?}");
    }
}

#[test]
fn message_reads_well() {
    let err = parse_documents(
        "type: Mesh\nname: a\nmtls:\n  backends:\n  - name: x\n    type: builtin\n    tpye: y\n",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(
            "document 1 (Mesh/a), line 7, field `mtls.backends[0].tpye`: unknown field `tpye`"
        ),
        "{text}"
    );
}

/// A small document whose field paths would cost its depth times its item count (here 60
/// levels of 1,000-byte keys over 100,000 items: 6 GB of paths from a 260 KB document) is
/// refused as too large, without building them.
#[test]
fn deep_long_keys_over_many_items_are_refused_not_indexed() {
    let key = "k".repeat(1000);
    let mut doc = String::from("type: Dataplane\nmesh: default\nname: dp\n");
    for depth in 0..60 {
        doc.push_str(&" ".repeat(depth));
        doc.push_str(&key);
        doc.push_str(":\n");
    }
    doc.push_str(&" ".repeat(60));
    doc.push_str("items: [");
    doc.push_str(&"a,".repeat(100_000));
    doc.push_str("a]\n");
    let err = parse_documents(&doc).expect_err("refused");
    assert!(err.message.contains("too large"), "{err}");
}
