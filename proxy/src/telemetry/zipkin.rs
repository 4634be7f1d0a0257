//! A Zipkin v2 JSON span exporter: a batch of spans is one `POST` of a JSON array to the
//! backend's URL (e.g. `http://jaeger:9411/api/v2/spans`).
//!
//! Why not `opentelemetry-zipkin`: it is not in the stack checked for this workspace, and its
//! only HTTP transport is reqwest 0.13 (the workspace has 0.12), which would bring a second
//! reqwest and its TLS stack into the proxy. The v2 format is small, and the proxy already has
//! hyper's client. Only `http://` URLs are supported (no TLS client roots in the proxy).
//!
//! Mapping: `traceId`/`id`/`parentId` in lowercase hex; `kind` `CLIENT`/`SERVER`; `timestamp`
//! and `duration` in microseconds; `localEndpoint.serviceName` = the proxy's service;
//! `remoteEndpoint` from `peer.service` and `network.peer.address`/`network.peer.port`; the
//! span's attributes (the same set as OTLP's, see [`super::otlp`], except the peer address,
//! which is the remote endpoint's) become string tags; an error becomes the `error` tag.
//!
//! The JSON is written straight into one buffer rather than through serde structs: it is a
//! fixed, flat shape, and this runs for every span the proxy exports. The buffer is reused
//! from batch to batch (a batch of 512 spans is about 300 KiB), and what is the same for
//! every span of the exporter (the local endpoint) is encoded once.

use std::borrow::Borrow;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use weft_api::mesh::TracingBackendType;

use super::span::{IpText, ServerName, SpanKind, SpanRecord, hex_into, span_hex, trace_hex};
use super::{TelemetryError, with_causes};

/// Exports spans to a Zipkin v2 HTTP endpoint.
pub struct ZipkinExporter {
    client: Client<HttpConnector, Full<Bytes>>,
    url: http::Uri,
    local_service: String,
    /// What is the same in every span: `,"localEndpoint":{...}` and the `weft.mesh` tag.
    fixed: Fixed,
    /// The last batch's buffer, reclaimed once hyper has sent and dropped it.
    buf: BytesMut,
}

impl fmt::Debug for ZipkinExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZipkinExporter")
            .field("url", &self.url)
            .field("local_service", &self.local_service)
            .finish_non_exhaustive()
    }
}

impl ZipkinExporter {
    /// An exporter posting to `url` (`http://…`) for spans of `local_service` in `mesh`.
    pub fn new(url: &str, local_service: &str, mesh: &str) -> Result<Self, TelemetryError> {
        let uri = TracingBackendType::Zipkin
            .collector_url(url)
            .map_err(|reason| TelemetryError::Backend {
                backend: "zipkin",
                reason,
            })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            url: uri,
            local_service: local_service.to_string(),
            fixed: Fixed::new(local_service, mesh),
            buf: BytesMut::new(),
        })
    }

    /// Posts one batch.
    pub async fn export<S: Borrow<SpanRecord>>(&mut self, batch: &[S]) -> Result<(), String> {
        encode_into(&mut self.buf, batch, &self.fixed);
        let body = self.buf.split().freeze();
        let request = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("zipkin request: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("zipkin post: {}", with_causes(&e)))?;
        let status = response.status();
        // Read the (small) body so the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("zipkin answered {status}"))
        }
    }
}

/// A batch as a Zipkin v2 JSON array, for spans of `local_service` in `mesh`.
pub fn encode<S: Borrow<SpanRecord>>(batch: &[S], local_service: &str, mesh: &str) -> Bytes {
    let mut buf = BytesMut::new();
    encode_into(&mut buf, batch, &Fixed::new(local_service, mesh));
    buf.freeze()
}

/// The parts of a span's JSON that are the same in every span of an exporter, written once.
#[derive(Debug)]
struct Fixed {
    /// `,"localEndpoint":{"serviceName":...}`.
    local_endpoint: Vec<u8>,
    /// `,"weft.mesh":...`, a tag.
    mesh_tag: Vec<u8>,
}

impl Fixed {
    fn new(local_service: &str, mesh: &str) -> Self {
        let mut local_endpoint = BytesMut::new();
        local_endpoint.extend_from_slice(b",\"localEndpoint\":{\"serviceName\":");
        string(&mut local_endpoint, local_service);
        local_endpoint.extend_from_slice(b"}");
        let mut mesh_tag = BytesMut::new();
        tag(&mut mesh_tag, b",\"weft.mesh\":\"", mesh);
        Self {
            local_endpoint: local_endpoint.to_vec(),
            mesh_tag: mesh_tag.to_vec(),
        }
    }
}

/// Writes a batch as a Zipkin v2 JSON array into `out` (emptied first). Reuses `out`'s
/// allocation when the last batch taken from it has been dropped.
fn encode_into<S: Borrow<SpanRecord>>(out: &mut BytesMut, batch: &[S], fixed: &Fixed) {
    out.clear();
    // About 600 bytes per span: no regrowth in the common case.
    out.reserve(batch.len() * 640 + 2);
    out.extend_from_slice(b"[");
    for (i, span) in batch.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",");
        }
        encode_span(out, span.borrow(), fixed);
    }
    out.extend_from_slice(b"]");
}

/// Whether `b` must be escaped inside a JSON string.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// A JSON string literal.
fn string(out: &mut BytesMut, s: &str) {
    out.put_u8(b'"');
    escaped(out, s);
    out.put_u8(b'"');
}

/// The inside of a JSON string literal.
fn escaped(out: &mut BytesMut, s: &str) {
    // Almost every value (names, paths, ids) needs no escaping: one scan, one copy.
    if !s.bytes().any(needs_escape) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&s.as_bytes()[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                let mut hex = [0u8; 2];
                hex_into(&[b], &mut hex);
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&hex);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&s.as_bytes()[start..]);
}

/// `,"key":"` as one literal: each tag is three copies (this, the value, the closing quote)
/// rather than six. Keys are weft's own names, which need no escaping.
macro_rules! key {
    ($key:literal) => {
        concat!(",\"", $key, "\":\"").as_bytes()
    };
}

/// `,"key":"value"` of a tag after the first; `key` from [`key!`].
fn tag(out: &mut BytesMut, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    escaped(out, value);
    out.put_u8(b'"');
}

/// `,"key":"number"` of a tag, written without an intermediate `String`.
fn tag_number(out: &mut BytesMut, key: &[u8], value: u64) {
    out.extend_from_slice(key);
    number(out, value);
    out.put_u8(b'"');
}

/// A number in decimal (`itoa`: the formatting machinery of `write!` costs more than the
/// digits).
fn number(out: &mut BytesMut, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn micros(nanos: u64) -> u64 {
    nanos / 1_000
}

fn encode_span(out: &mut BytesMut, s: &SpanRecord, fixed: &Fixed) {
    out.extend_from_slice(b"{\"traceId\":\"");
    out.extend_from_slice(&trace_hex(s.trace_id));
    out.extend_from_slice(b"\",\"id\":\"");
    out.extend_from_slice(&span_hex(s.span_id));
    out.put_u8(b'"');
    if let Some(p) = s.parent_id {
        out.extend_from_slice(b",\"parentId\":\"");
        out.extend_from_slice(&span_hex(p));
        out.put_u8(b'"');
    }
    // The span name is the method: a standard method's name or `_OTHER`, nothing to escape.
    out.extend_from_slice(b",\"name\":\"");
    out.extend_from_slice(s.method.as_bytes());
    out.put_u8(b'"');
    out.extend_from_slice(match s.kind {
        SpanKind::Client => b",\"kind\":\"CLIENT\"",
        SpanKind::Server => b",\"kind\":\"SERVER\"",
    });
    let start = micros(s.start_unix_nanos());
    // Zipkin treats 0 as "unknown"; a finished span lasted at least a microsecond.
    let duration = u64::try_from(s.duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    out.extend_from_slice(b",\"timestamp\":");
    number(out, start);
    out.extend_from_slice(b",\"duration\":");
    number(out, duration);
    out.extend_from_slice(&fixed.local_endpoint);
    if s.peer_service.is_some() || s.peer.is_some() {
        out.extend_from_slice(b",\"remoteEndpoint\":{");
        let mut first = true;
        if let Some(name) = &s.peer_service {
            first = false;
            out.extend_from_slice(b"\"serviceName\":");
            string(out, name);
        }
        if let Some(peer) = s.peer {
            if !first {
                out.put_u8(b',');
            }
            out.extend_from_slice(match peer.ip() {
                IpAddr::V4(_) => b"\"ipv4\":\"",
                IpAddr::V6(_) => b"\"ipv6\":\"",
            });
            out.extend_from_slice(IpText::new(peer.ip()).as_str().as_bytes());
            out.extend_from_slice(b"\",\"port\":");
            number(out, u64::from(peer.port()));
        }
        out.put_u8(b'}');
    }
    out.extend_from_slice(b",\"tags\":{\"http.request.method\":\"");
    out.extend_from_slice(s.method.as_bytes());
    out.put_u8(b'"');
    if let Some(original) = &s.method_original {
        tag(out, key!("http.request.method_original"), original);
    }
    tag(out, key!("url.path"), s.url_path());
    out.extend_from_slice(if s.https {
        b",\"url.scheme\":\"https\""
    } else {
        b",\"url.scheme\":\"http\""
    });
    if let Some((host, port)) = s.server.as_ref().map(ServerName::host_port) {
        tag(out, key!("server.address"), host);
        if let Some(p) = port {
            tag_number(out, key!("server.port"), u64::from(p));
        }
    }
    out.extend_from_slice(&fixed.mesh_tag);
    tag(out, key!("weft.direction"), s.direction());
    tag(out, key!("weft.service"), &s.service);
    if let Some(p) = &s.peer_service {
        tag(out, key!("peer.service"), p);
    }
    if let Some(code) = s.status {
        tag_number(out, key!("http.response.status_code"), u64::from(code));
    }
    if let Some(e) = &s.error {
        tag(out, key!("error.type"), &e.error_type());
        let message = e.message();
        tag(
            out,
            key!("error"),
            if message.is_empty() { "true" } else { message },
        );
    }
    out.extend_from_slice(b"}}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::span::{InlineStr, ServerName, SpanError, new_span_id, new_trace_id};
    use std::sync::Arc;
    use std::time::SystemTime;

    #[test]
    fn refuses_urls_it_cannot_post_to() {
        for url in ["", "jaeger:9411", "https://jaeger/api/v2/spans", "ftp://x/"] {
            assert!(ZipkinExporter::new(url, "web", "m").is_err(), "{url}");
        }
        assert!(ZipkinExporter::new("http://127.0.0.1:9411/api/v2/spans", "web", "m").is_ok());
    }

    #[tokio::test]
    async fn a_refused_connection_is_named_in_the_error() {
        // A port nothing listens on: bind one, then close it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut exporter = ZipkinExporter::new(&format!("http://{addr}/api/v2/spans"), "web", "m")
            .expect("exporter");
        let error = exporter
            .export::<SpanRecord>(&[])
            .await
            .expect_err("nothing listens");
        assert!(error.contains("refused"), "{error}");
    }

    #[test]
    fn encodes_valid_v2_json() {
        let span = SpanRecord {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_id: Some(new_span_id()),
            kind: SpanKind::Server,
            method: "_OTHER",
            method_original: Some("PURGE".into()),
            path: InlineStr::new("/a\"b\\c"),
            https: false,
            server: ServerName::new(b"backend:8080"),
            service: Arc::from("backend"),
            peer_service: Some(Arc::from("web\u{1}")),
            start: SystemTime::now(),
            duration: Duration::from_micros(250),
            status: Some(503),
            peer: Some("10.0.0.1:40000".parse().expect("addr")),
            error: Some(SpanError::Status(503)),
        };
        let json = encode(&[span.clone(), span.clone()], "backend", "default");
        let v: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
        let s = &v[1];
        assert_eq!(s["traceId"], span.trace_id.to_string());
        assert_eq!(s["parentId"], span.parent_id.expect("parent").to_string());
        assert_eq!(s["kind"], "SERVER");
        assert_eq!(s["duration"], 250);
        assert_eq!(s["localEndpoint"]["serviceName"], "backend");
        assert_eq!(s["remoteEndpoint"]["serviceName"], "web\u{1}");
        assert_eq!(s["remoteEndpoint"]["ipv4"], "10.0.0.1");
        assert_eq!(s["remoteEndpoint"]["port"], 40000);
        let tags = &s["tags"];
        assert_eq!(tags["url.path"], "/a\"b\\c");
        assert_eq!(s["name"], "_OTHER");
        assert_eq!(tags["http.request.method"], "_OTHER");
        assert_eq!(tags["http.request.method_original"], "PURGE");
        assert_eq!(tags["url.scheme"], "http");
        assert_eq!(tags["weft.mesh"], "default");
        assert_eq!(tags["weft.direction"], "inbound");
        assert_eq!(tags["weft.service"], "backend");
        assert_eq!(tags["peer.service"], "web\u{1}");
        assert_eq!(tags["server.address"], "backend");
        assert_eq!(tags["server.port"], "8080");
        assert_eq!(tags["http.response.status_code"], "503");
        assert_eq!(tags["error.type"], "503");
        assert_eq!(tags["error"], "true");
        assert_eq!(encode::<SpanRecord>(&[], "x", "m"), &b"[]"[..]);
    }
}
