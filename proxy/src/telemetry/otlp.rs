//! The OTLP/gRPC span exporter (`opentelemetry` tracing backends): a batch of
//! [`SpanRecord`]s becomes one `TraceService/Export` call over a lazily connected tonic
//! channel.
//!
//! Attributes follow the OTel HTTP semantic conventions (`http.request.method`, `url.path`,
//! `url.scheme`, `server.address`, `server.port`, `http.response.status_code`,
//! `network.peer.address`, `network.peer.port`, `error.type`) plus `weft.mesh`,
//! `weft.direction`, `weft.service` and `peer.service`. The resource carries `service.name`
//! (the proxy's `kuma.io/service`) and `weft.mesh`.
//!
//! The request is written as protobuf straight into one reused buffer, framed as a gRPC message
//! in place, and sent on the tonic channel as the request body without a copy. Building
//! `opentelemetry-proto`'s structs and letting prost encode them took 3.1 µs and about 30
//! allocations per span (two `String`s per attribute, and prost sizes each nested message once
//! per level above it); writing the bytes takes 0.35 µs (release build, batches of 512), and
//! this runs for every span the proxy exports. The structs remain the reference: the tests decode the bytes with prost and compare
//! them with what the structs give for the same spans. Prost decodes the response.
//!
//! The unary call itself is written here too (`call`, `read_response`): tonic's client copies
//! every request into a buffer of its own, allocated for each call and grown from 8 KiB, so each
//! export of a 200 KiB batch filled a second buffer of that size. The channel (connection,
//! HTTP/2, timeouts) is still tonic's.

use std::borrow::Borrow;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, TE, USER_AGENT};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use prost::encoding::{encode_varint, encoded_len_varint};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tower::{Service, ServiceExt};
use weft_api::mesh::TracingBackendType;

use super::span::{IpText, ServerName, SpanError, SpanKind, SpanRecord};
use super::{TelemetryError, with_causes};

/// The OTLP trace service's one method.
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Exports spans to an OTLP/gRPC collector.
pub struct OtlpExporter {
    channel: Channel,
    endpoint: String,
    /// `ResourceSpans.resource` as an encoded field: the same in every request.
    resource_field: Vec<u8>,
    /// `ScopeSpans.scope` as an encoded field.
    scope_field: Vec<u8>,
    /// The `weft.mesh` attribute as an encoded `Span.attributes` field: the same in every
    /// span.
    mesh_field: Vec<u8>,
    /// The last request's buffer, reclaimed once the channel has sent and dropped it.
    buf: BytesMut,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    kv(key, Value::StringValue(value.to_string()))
}

impl OtlpExporter {
    /// An exporter to `endpoint` (`host:port` or `http://…`) for spans of `service` in
    /// `mesh`. Connects on first export (and again after a failure); each call is bounded by
    /// `timeout`. Needs a tokio runtime.
    pub fn new(
        endpoint: &str,
        service: &str,
        mesh: &str,
        timeout: Duration,
    ) -> Result<Self, TelemetryError> {
        let url = TracingBackendType::Opentelemetry
            .collector_url(endpoint)
            .map_err(|reason| TelemetryError::Backend {
                backend: "opentelemetry",
                reason,
            })?;
        let channel = Endpoint::from(url)
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            channel,
            endpoint: endpoint.to_string(),
            resource_field: resource_field(service, mesh),
            scope_field: scope_field(),
            mesh_field: mesh_field(mesh),
            buf: BytesMut::new(),
        })
    }

    /// Sends one batch.
    pub async fn export<S: Borrow<SpanRecord>>(&mut self, batch: &[S]) -> Result<(), String> {
        let message = encode_request(
            &mut self.buf,
            batch,
            &self.resource_field,
            &self.scope_field,
            &self.mesh_field,
        );
        match call(&mut self.channel, message).await {
            Ok(response) => match response.partial_success {
                Some(p) if p.rejected_spans > 0 => Err(format!(
                    "collector rejected {} spans: {}",
                    p.rejected_spans, p.error_message
                )),
                _ => Ok(()),
            },
            Err(status) => Err(format!("otlp export: {status}")),
        }
    }
}

/// The length of a gRPC message's prefix: a compression flag and a big-endian `u32` length.
const GRPC_PREFIX: usize = 5;

/// One unary `Export` call on `channel`: `message` is the whole request body, a gRPC message
/// frame ([`encode_request`]). The channel adds the collector's scheme and authority.
async fn call(channel: &mut Channel, message: Bytes) -> Result<ExportTraceServiceResponse, Status> {
    let mut request = http::Request::new(tonic::body::Body::new(Full::new(message)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(EXPORT);
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    headers.insert(USER_AGENT, HeaderValue::from_static("weft-proxy"));
    let response = channel
        .ready()
        .await
        .map_err(|e| Status::unavailable(with_causes(&e)))?
        .call(request)
        .await
        .map_err(|e| Status::unavailable(with_causes(&e)))?;
    let (head, body) = response.into_parts();
    // A call that fails at once answers with its status in the headers and no body.
    if let Some(status) = Status::from_header_map(&head.headers) {
        return Err(if status.code() == Code::Ok {
            Status::internal("the collector answered OK without a message")
        } else {
            status
        });
    }
    if head.status != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "the collector answered HTTP {}",
            head.status
        )));
    }
    let body = body
        .collect()
        .await
        .map_err(|e| Status::unavailable(format!("reading the response: {e}")))?;
    let trailers = body.trailers().cloned().unwrap_or_default();
    read_response(body.to_bytes(), &trailers)
}

/// The call's outcome from the response body and trailers: the `grpc-status` in the trailers,
/// and with `OK` the one message in the body.
fn read_response(
    mut body: Bytes,
    trailers: &HeaderMap,
) -> Result<ExportTraceServiceResponse, Status> {
    let status = Status::from_header_map(trailers)
        .ok_or_else(|| Status::internal("the collector's response has no grpc-status"))?;
    if status.code() != Code::Ok {
        return Err(status);
    }
    if body.len() < GRPC_PREFIX {
        return Err(Status::internal(format!(
            "the collector's response body is {} bytes, too short for a gRPC message",
            body.len()
        )));
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        // The request offers no `grpc-accept-encoding`, so a compressed answer breaks the
        // protocol.
        return Err(Status::internal(
            "the collector compressed its response unasked",
        ));
    }
    if len != body.len() {
        return Err(Status::internal(format!(
            "the collector's response message says {len} bytes and carries {}",
            body.len()
        )));
    }
    ExportTraceServiceResponse::decode(body)
        .map_err(|e| Status::internal(format!("the collector's response: {e}")))
}

// Protobuf keys (field number and wire type) of what the encoder writes, from
// `opentelemetry-proto`'s messages. Wire types: 0 varint, 1 fixed 64 bits, 2 length-delimited,
// 5 fixed 32 bits.
const fn key(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}
/// `ExportTraceServiceRequest.resource_spans`.
const RESOURCE_SPANS: u8 = key(1, 2);
/// `ResourceSpans.resource`.
const RESOURCE: u8 = key(1, 2);
/// `ResourceSpans.scope_spans`.
const SCOPE_SPANS: u8 = key(2, 2);
/// `ScopeSpans.scope`.
const SCOPE: u8 = key(1, 2);
/// `ScopeSpans.spans`.
const SPANS: u8 = key(2, 2);
const SPAN_TRACE_ID: u8 = key(1, 2);
const SPAN_SPAN_ID: u8 = key(2, 2);
const SPAN_PARENT_SPAN_ID: u8 = key(4, 2);
const SPAN_NAME: u8 = key(5, 2);
const SPAN_KIND: u8 = key(6, 0);
const SPAN_START: u8 = key(7, 1);
const SPAN_END: u8 = key(8, 1);
const SPAN_ATTRIBUTES: u8 = key(9, 2);
const SPAN_STATUS: u8 = key(15, 2);
/// `Span.flags` (field 16, fixed 32 bits): key 16 << 3 | 5 = 133, two bytes as a varint.
const SPAN_FLAGS: [u8; 2] = [0x85, 0x01];
/// `Span.flags`: the W3C sampled bit; only sampled spans are recorded.
const SAMPLED: u32 = 0x1;
const KEY_VALUE_KEY: u8 = key(1, 2);
const KEY_VALUE_VALUE: u8 = key(2, 2);
const ANY_VALUE_STRING: u8 = key(1, 2);
const ANY_VALUE_INT: u8 = key(3, 0);
const STATUS_MESSAGE: u8 = key(2, 2);
const STATUS_CODE: u8 = key(3, 0);
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u8 = 2;
/// `Span.SpanKind.SPAN_KIND_SERVER` and `SPAN_KIND_CLIENT`.
const KIND_SERVER: u8 = 2;
const KIND_CLIENT: u8 = 3;

/// A varint; one byte, the common case for the lengths and numbers of a span, without a call
/// (prost's `encode_varint` is not inlined).
#[inline]
fn put_varint(out: &mut impl BufMut, value: u64) {
    if value < 0x80 {
        out.put_u8(value as u8);
    } else {
        encode_varint(value, out);
    }
}

/// A length-delimited field's key and length prefix.
fn put_len_prefix(out: &mut impl BufMut, key: u8, len: usize) {
    out.put_u8(key);
    put_varint(out, len as u64);
}

/// The encoded size of a length-delimited field (one-byte key) with `len` bytes of content.
fn len_field_size(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn put_string(out: &mut BytesMut, key: u8, s: &str) {
    put_len_prefix(out, key, s.len());
    out.put_slice(s.as_bytes());
}

/// `ResourceSpans.resource`, encoded once per exporter (by prost: it is not per span).
fn resource_field(service: &str, mesh: &str) -> Vec<u8> {
    let resource = Resource {
        attributes: vec![text("service.name", service), text("weft.mesh", mesh)],
        ..Resource::default()
    };
    message_field(RESOURCE, &resource)
}

/// `ScopeSpans.scope`: weft-proxy and its version.
fn scope_field() -> Vec<u8> {
    let scope = InstrumentationScope {
        name: "weft-proxy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    };
    message_field(SCOPE, &scope)
}

/// The `weft.mesh` attribute as a `Span.attributes` field.
fn mesh_field(mesh: &str) -> Vec<u8> {
    message_field(SPAN_ATTRIBUTES, &text("weft.mesh", mesh))
}

fn message_field(key: u8, message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(len_field_size(body.len()));
    put_len_prefix(&mut out, key, body.len());
    out.extend_from_slice(&body);
    out
}

/// A batch as an `ExportTraceServiceRequest` (one resource, one scope) in a gRPC message
/// frame, written into `out` (emptied first; its allocation is reused once the last request
/// taken from it is dropped).
fn encode_request<S: Borrow<SpanRecord>>(
    out: &mut BytesMut,
    batch: &[S],
    resource_field: &[u8],
    scope_field: &[u8],
    mesh_field: &[u8],
) -> Bytes {
    // The gRPC prefix and the envelope come before the spans but hold their length: leave room
    // for their longest form, write the spans, then write them just before the spans.
    const MAX_VARINT: usize = 10;
    let room = GRPC_PREFIX + 2 * (1 + MAX_VARINT) + resource_field.len() + scope_field.len();
    out.clear();
    // About 420 bytes per span: no regrowth in the common case.
    out.reserve(room + batch.len() * 512);
    out.resize(room, 0);
    for span in batch {
        encode_span(out, span.borrow(), mesh_field);
    }
    let scope_spans = scope_field.len() + (out.len() - room);
    let resource_spans = resource_field.len() + len_field_size(scope_spans);
    let message_len = len_field_size(resource_spans);
    let mut head = Vec::with_capacity(room);
    head.put_u8(0); // not compressed
    // Over 4 GiB a batch could not be sent anyway; the queue holds a few MiB at most.
    head.put_u32(u32::try_from(message_len).unwrap_or(u32::MAX));
    put_len_prefix(&mut head, RESOURCE_SPANS, resource_spans);
    head.extend_from_slice(resource_field);
    put_len_prefix(&mut head, SCOPE_SPANS, scope_spans);
    head.extend_from_slice(scope_field);
    let start = room - head.len();
    out[start..room].copy_from_slice(&head);
    out.split().freeze().slice(start..)
}

/// An attribute's value.
#[derive(Clone, Copy)]
enum AttributeValue<'a> {
    Text(&'a str),
    Int(i64),
}

impl AttributeValue<'_> {
    /// The encoded size of the `AnyValue`.
    fn size(self) -> usize {
        match self {
            AttributeValue::Text(s) => len_field_size(s.len()),
            AttributeValue::Int(i) => 1 + encoded_len_varint(i as u64),
        }
    }
}

/// The most attributes a span has (see [`Attributes::of`]).
const MAX_ATTRIBUTES: usize = 13;

/// A span's attributes, on the stack.
struct Attributes<'a> {
    items: [(&'static str, AttributeValue<'a>); MAX_ATTRIBUTES],
    len: usize,
}

impl<'a> Attributes<'a> {
    /// The attributes of `s`; `peer` is its peer's address as text and port, `error_type`
    /// its error's `error.type`.
    fn of(s: &'a SpanRecord, peer: Option<(&'a str, u16)>, error_type: Option<&'a str>) -> Self {
        let mut a = Self {
            items: [("", AttributeValue::Int(0)); MAX_ATTRIBUTES],
            len: 0,
        };
        a.push("http.request.method", AttributeValue::Text(s.method));
        if let Some(original) = &s.method_original {
            a.push(
                "http.request.method_original",
                AttributeValue::Text(original),
            );
        }
        a.push("url.path", AttributeValue::Text(s.url_path()));
        let scheme = if s.https { "https" } else { "http" };
        a.push("url.scheme", AttributeValue::Text(scheme));
        if let Some((host, port)) = s.server.as_ref().map(ServerName::host_port) {
            a.push("server.address", AttributeValue::Text(host));
            if let Some(p) = port {
                a.push("server.port", AttributeValue::Int(i64::from(p)));
            }
        }
        a.push("weft.direction", AttributeValue::Text(s.direction()));
        a.push("weft.service", AttributeValue::Text(&s.service));
        if let Some(p) = &s.peer_service {
            a.push("peer.service", AttributeValue::Text(p));
        }
        if let Some(code) = s.status {
            let code = AttributeValue::Int(i64::from(code));
            a.push("http.response.status_code", code);
        }
        if let Some((address, port)) = peer {
            a.push("network.peer.address", AttributeValue::Text(address));
            a.push("network.peer.port", AttributeValue::Int(i64::from(port)));
        }
        if let Some(t) = error_type {
            a.push("error.type", AttributeValue::Text(t));
        }
        a
    }

    fn push(&mut self, key: &'static str, value: AttributeValue<'a>) {
        self.items[self.len] = (key, value);
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = (&'static str, AttributeValue<'a>)> + '_ {
        self.items[..self.len].iter().copied()
    }
}

/// The encoded size of a `KeyValue`.
fn key_value_size(key: &str, value: AttributeValue<'_>) -> usize {
    len_field_size(key.len()) + len_field_size(value.size())
}

/// The encoded size of a `Status` with `message` and the error code.
fn status_size(message: &str) -> usize {
    let message = if message.is_empty() {
        0
    } else {
        len_field_size(message.len())
    };
    message + 2
}

/// One `ScopeSpans.spans` field; `mesh_field` is the encoded `weft.mesh` attribute, which
/// follows the others.
fn encode_span(out: &mut BytesMut, s: &SpanRecord, mesh_field: &[u8]) {
    let peer = s.peer.map(|p| (IpText::new(p.ip()), p.port()));
    let error_type = s.error.as_ref().map(SpanError::error_type);
    let attributes = Attributes::of(
        s,
        peer.as_ref().map(|(ip, port)| (ip.as_str(), *port)),
        error_type.as_deref(),
    );
    let status_message = s.error.as_ref().map(SpanError::message);

    let mut size = len_field_size(16) + len_field_size(8);
    if s.parent_id.is_some() {
        size += len_field_size(8);
    }
    size += len_field_size(s.method.len()) + 2 + 2 * (1 + 8);
    size += attributes
        .iter()
        .map(|(k, v)| len_field_size(key_value_size(k, v)))
        .sum::<usize>();
    size += mesh_field.len();
    if let Some(m) = status_message {
        size += len_field_size(status_size(m));
    }
    size += SPAN_FLAGS.len() + 4;

    put_len_prefix(out, SPANS, size);
    let start = out.len();
    put_len_prefix(out, SPAN_TRACE_ID, 16);
    out.put_slice(&s.trace_id.to_bytes());
    put_len_prefix(out, SPAN_SPAN_ID, 8);
    out.put_slice(&s.span_id.to_bytes());
    if let Some(parent) = s.parent_id {
        put_len_prefix(out, SPAN_PARENT_SPAN_ID, 8);
        out.put_slice(&parent.to_bytes());
    }
    put_string(out, SPAN_NAME, s.method);
    out.put_u8(SPAN_KIND);
    out.put_u8(match s.kind {
        SpanKind::Client => KIND_CLIENT,
        SpanKind::Server => KIND_SERVER,
    });
    out.put_u8(SPAN_START);
    out.put_u64_le(s.start_unix_nanos());
    out.put_u8(SPAN_END);
    out.put_u64_le(s.end_unix_nanos());
    for (k, v) in attributes.iter() {
        put_len_prefix(out, SPAN_ATTRIBUTES, key_value_size(k, v));
        put_string(out, KEY_VALUE_KEY, k);
        put_len_prefix(out, KEY_VALUE_VALUE, v.size());
        match v {
            AttributeValue::Text(t) => put_string(out, ANY_VALUE_STRING, t),
            AttributeValue::Int(i) => {
                out.put_u8(ANY_VALUE_INT);
                put_varint(out, i as u64);
            }
        }
    }
    out.put_slice(mesh_field);
    if let Some(m) = status_message {
        put_len_prefix(out, SPAN_STATUS, status_size(m));
        if !m.is_empty() {
            put_string(out, STATUS_MESSAGE, m);
        }
        out.put_u8(STATUS_CODE);
        out.put_u8(STATUS_CODE_ERROR);
    }
    out.put_slice(&SPAN_FLAGS);
    out.put_u32_le(SAMPLED);
    debug_assert_eq!(out.len() - start, size, "span size");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::span::{InlineStr, new_span_id, new_trace_id};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind as PbKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use std::sync::Arc;
    use std::time::SystemTime;

    /// One span in OTLP's model.
    fn to_proto(s: &SpanRecord, mesh: &str) -> Span {
        let mut attributes = Vec::with_capacity(14);
        attributes.push(text("http.request.method", s.method));
        if let Some(original) = &s.method_original {
            attributes.push(text("http.request.method_original", original));
        }
        attributes.push(text("url.path", s.url_path()));
        attributes.push(text("url.scheme", if s.https { "https" } else { "http" }));
        if let Some((host, port)) = s.server.as_ref().map(ServerName::host_port) {
            attributes.push(kv("server.address", Value::StringValue(host.to_string())));
            if let Some(p) = port {
                attributes.push(kv("server.port", Value::IntValue(i64::from(p))));
            }
        }
        attributes.push(text("weft.direction", s.direction()));
        attributes.push(text("weft.service", &s.service));
        if let Some(p) = &s.peer_service {
            attributes.push(text("peer.service", p));
        }
        if let Some(code) = s.status {
            attributes.push(kv(
                "http.response.status_code",
                Value::IntValue(i64::from(code)),
            ));
        }
        if let Some(peer) = s.peer {
            attributes.push(kv(
                "network.peer.address",
                Value::StringValue(peer.ip().to_string()),
            ));
            attributes.push(kv(
                "network.peer.port",
                Value::IntValue(i64::from(peer.port())),
            ));
        }
        if let Some(e) = &s.error {
            attributes.push(kv("error.type", Value::StringValue(e.error_type())));
        }
        attributes.push(text("weft.mesh", mesh));
        let status = s.error.as_ref().map(|e| Status {
            message: e.message().to_string(),
            code: StatusCode::Error as i32,
        });
        Span {
            trace_id: s.trace_id.to_bytes().to_vec(),
            span_id: s.span_id.to_bytes().to_vec(),
            parent_span_id: s
                .parent_id
                .map(|p| p.to_bytes().to_vec())
                .unwrap_or_default(),
            // Sampled: only sampled spans are recorded.
            flags: 0x1,
            name: s.method.to_string(),
            kind: match s.kind {
                SpanKind::Client => PbKind::Client as i32,
                SpanKind::Server => PbKind::Server as i32,
            },
            start_time_unix_nano: s.start_unix_nanos(),
            end_time_unix_nano: s.end_unix_nanos(),
            attributes,
            status,
            ..Span::default()
        }
    }

    /// The same batch through `opentelemetry-proto`'s structs, the reference for the encoder.
    fn reference(batch: &[SpanRecord], service: &str, mesh: &str) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![text("service.name", service), text("weft.mesh", mesh)],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weft-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans: batch.iter().map(|s| to_proto(s, mesh)).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn span(kind: SpanKind) -> SpanRecord {
        SpanRecord {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_id: Some(new_span_id()),
            kind,
            method: "GET",
            method_original: None,
            path: InlineStr::new("/api/items"),
            https: false,
            server: ServerName::new(b"backend:8080"),
            service: Arc::from("backend"),
            peer_service: Some(Arc::from("web")),
            start: SystemTime::now(),
            duration: Duration::from_micros(250),
            status: Some(200),
            peer: Some("10.0.0.1:40000".parse().expect("addr")),
            error: None,
        }
    }

    /// Spans that between them take every branch of the encoder.
    fn varied_spans() -> Vec<SpanRecord> {
        let plain = span(SpanKind::Client);
        let mut root = span(SpanKind::Server);
        root.parent_id = None;
        root.peer_service = None;
        root.server = None;
        root.peer = Some("[fd00::1:2]:8443".parse().expect("addr"));
        let mut odd = span(SpanKind::Client);
        odd.method = "_OTHER";
        odd.method_original = Some("PURGE".into());
        odd.path = InlineStr::new(&format!("/{}", "long/path/".repeat(30)));
        odd.https = true;
        odd.server = ServerName::new(b"backend");
        odd.status = Some(503);
        odd.error = Some(SpanError::Status(503));
        let mut failed = span(SpanKind::Client);
        failed.status = None;
        failed.peer = None;
        failed.error = Some(SpanError::Transport {
            kind: "transport",
            message: "connection refused: ".repeat(10),
        });
        let mut unanswered = span(SpanKind::Server);
        unanswered.status = None;
        unanswered.error = Some(SpanError::NoResponse);
        vec![plain, root, odd, failed, unanswered]
    }

    /// The protobuf inside a gRPC message frame, checking the prefix.
    fn unframe(mut frame: Bytes) -> Bytes {
        assert_eq!(frame.get_u8(), 0, "not compressed");
        let len = frame.get_u32() as usize;
        assert_eq!(len, frame.len(), "the prefix's length");
        frame
    }

    #[test]
    fn the_encoding_decodes_to_the_reference_structs() {
        let spans = varied_spans();
        let mut buf = BytesMut::new();
        for batch in [&spans[..], &spans[..1], &[][..]] {
            let bytes = encode_request(
                &mut buf,
                batch,
                &resource_field("backend", "default"),
                &scope_field(),
                &mesh_field("default"),
            );
            let decoded =
                ExportTraceServiceRequest::decode(unframe(bytes)).expect("valid protobuf");
            assert_eq!(decoded, reference(batch, "backend", "default"));
        }
    }

    #[test]
    fn a_large_batch_reuses_the_buffer_and_still_decodes() {
        // Thousands of spans: the envelope's lengths take more than two varint bytes.
        let batch: Vec<SpanRecord> = (0..1000).map(|_| span(SpanKind::Server)).collect();
        let mut buf = BytesMut::new();
        let resource = resource_field("backend", "default");
        let scope = scope_field();
        let mesh = mesh_field("default");
        let first = encode_request(&mut buf, &batch, &resource, &scope, &mesh);
        assert!(first.len() > 1 << 16, "{}", first.len());
        let decoded = ExportTraceServiceRequest::decode(unframe(first)).expect("valid protobuf");
        assert_eq!(decoded, reference(&batch, "backend", "default"));
        let again = encode_request(&mut buf, &batch[..2], &resource, &scope, &mesh);
        let decoded = ExportTraceServiceRequest::decode(unframe(again)).expect("valid protobuf");
        assert_eq!(decoded, reference(&batch[..2], "backend", "default"));
    }

    fn grpc_status(code: &str, message: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_str(code).expect("value"));
        if let Some(m) = message {
            h.insert("grpc-message", HeaderValue::from_str(m).expect("value"));
        }
        h
    }

    fn framed(message: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(0);
        b.put_u32(message.len() as u32);
        b.extend_from_slice(message);
        b.freeze()
    }

    #[test]
    fn responses_are_read_by_their_trailers_and_frame() {
        let partial = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "too old".into(),
            }),
        };
        let ok = grpc_status("0", None);
        let read = read_response(framed(&partial.encode_to_vec()), &ok).expect("OK");
        assert_eq!(read, partial);
        // An empty message is a valid (default) response.
        let read = read_response(framed(&[]), &ok).expect("OK");
        assert_eq!(read, ExportTraceServiceResponse::default());

        let error = read_response(Bytes::new(), &grpc_status("14", Some("overloaded")))
            .expect_err("an error status");
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(error.message(), "overloaded");

        for (body, trailers, says) in [
            (framed(&[]), HeaderMap::new(), "no grpc-status"),
            (Bytes::from_static(&[0, 0]), ok.clone(), "too short"),
            (
                Bytes::from_static(&[1, 0, 0, 0, 0]),
                ok.clone(),
                "compressed",
            ),
            (
                Bytes::from_static(&[0, 0, 0, 0, 9, 1]),
                ok.clone(),
                "says 9 bytes",
            ),
            (framed(&[0xff]), ok.clone(), "response"),
        ] {
            let error = read_response(body, &trailers).expect_err(says);
            assert!(error.message().contains(says), "{says}: {error}");
        }
    }

    /// A collector that answers every export with `answer`.
    struct Answering(Result<ExportTraceServiceResponse, Code>);

    #[tonic::async_trait]
    impl TraceService for Answering {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            assert_eq!(request.into_inner().resource_spans.len(), 1);
            match &self.0 {
                Ok(response) => Ok(tonic::Response::new(response.clone())),
                Err(code) => Err(tonic::Status::new(*code, "collector says no")),
            }
        }
    }

    async fn collector(answer: Result<ExportTraceServiceResponse, Code>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Answering(answer)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    #[tokio::test]
    async fn a_tonic_collector_gets_the_batch_and_its_answer_counts() {
        let batch = varied_spans();
        let export = async |addr: std::net::SocketAddr| {
            let mut exporter =
                OtlpExporter::new(&addr.to_string(), "web", "m", Duration::from_secs(5))
                    .expect("exporter");
            // Twice: the second call reuses the buffer and the connection.
            let first = exporter.export(&batch).await;
            (first, exporter.export(&batch[..1]).await)
        };

        let ok = collector(Ok(ExportTraceServiceResponse::default())).await;
        assert_eq!(export(ok).await, (Ok(()), Ok(())));

        let refused = collector(Err(Code::ResourceExhausted)).await;
        let (first, second) = export(refused).await;
        for result in [first, second] {
            let error = result.expect_err("an error status fails the export");
            assert!(error.contains("collector says no"), "{error}");
        }

        let partial = collector(Ok(ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 2,
                error_message: "too old".into(),
            }),
        }))
        .await;
        let (first, _) = export(partial).await;
        assert_eq!(
            first,
            Err("collector rejected 2 spans: too old".to_string())
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_named_in_the_error() {
        // A port nothing listens on: bind one, then close it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut exporter = OtlpExporter::new(&addr.to_string(), "web", "m", Duration::from_secs(5))
            .expect("exporter");
        let error = exporter
            .export(&varied_spans())
            .await
            .expect_err("nothing listens");
        assert!(error.contains("refused"), "{error}");
    }

    #[tokio::test]
    async fn endpoints_are_checked() {
        let new = |e: &str| OtlpExporter::new(e, "web", "m", Duration::from_secs(1));
        assert!(new("collector:4317").is_ok());
        assert!(new("http://127.0.0.1:4317").is_ok());
        for bad in ["", "collector", "https://collector:4317", "http://"] {
            assert!(new(bad).is_err(), "{bad}");
        }
    }
}
