//! The OTLP/gRPC span exporter (`opentelemetry` tracing backends): a batch of
//! [`SpanRecord`]s becomes one `TraceService/Export` call, in `opentelemetry-proto`'s types,
//! over a lazily connected tonic channel.
//!
//! Attributes follow the OTel HTTP semantic conventions (`http.request.method`, `url.path`,
//! `url.scheme`, `server.address`, `server.port`, `http.response.status_code`,
//! `network.peer.address`, `network.peer.port`, `error.type`) plus `weft.mesh`,
//! `weft.direction`, `weft.service` and `peer.service`. The resource carries `service.name`
//! (the proxy's `kuma.io/service`) and `weft.mesh`.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind as PbKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use tonic::transport::{Channel, Endpoint};

use super::TelemetryError;
use super::span::{ServerName, SpanKind, SpanRecord};

/// Exports spans to an OTLP/gRPC collector.
#[derive(Debug, Clone)]
pub struct OtlpExporter {
    client: TraceServiceClient<Channel>,
    resource: Resource,
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

/// An OTLP endpoint as tonic wants it: Kuma's examples give `host:port` without a scheme.
pub fn endpoint_url(endpoint: &str) -> Result<String, TelemetryError> {
    let e = endpoint.trim();
    if e.is_empty() {
        return Err(TelemetryError::Backend {
            backend: "opentelemetry",
            reason: "no endpoint".into(),
        });
    }
    let url = if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    };
    match url.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => Ok(url),
        Ok(u) if u.scheme_str() == Some("https") => Err(TelemetryError::Backend {
            backend: "opentelemetry",
            reason: format!("{endpoint:?}: https is not supported; use http"),
        }),
        _ => Err(TelemetryError::Backend {
            backend: "opentelemetry",
            reason: format!("{endpoint:?} is not host:port or an http:// URL"),
        }),
    }
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
        let url = endpoint_url(endpoint)?;
        let channel = Endpoint::from_shared(url)
            .map_err(|e| TelemetryError::Backend {
                backend: "opentelemetry",
                reason: format!("{endpoint:?}: {e}"),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            client: TraceServiceClient::new(channel),
            resource: Resource {
                attributes: vec![text("service.name", service), text("weft.mesh", mesh)],
                ..Resource::default()
            },
        })
    }

    /// Sends one batch.
    pub async fn export(&self, batch: &[SpanRecord]) -> Result<(), String> {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weft-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans: batch.iter().map(to_proto).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let mut client = self.client.clone();
        match client.export(request).await {
            Ok(response) => match response.into_inner().partial_success {
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

/// One span in OTLP's model.
pub fn to_proto(s: &SpanRecord) -> Span {
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
    attributes.push(text("weft.mesh", &s.mesh));
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
    let status = s.error.as_ref().map(|e| {
        attributes.push(kv("error.type", Value::StringValue(e.error_type())));
        Status {
            message: e.message().to_string(),
            code: StatusCode::Error as i32,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            endpoint_url("collector:4317").ok().as_deref(),
            Some("http://collector:4317")
        );
        assert!(endpoint_url("").is_err());
        assert!(endpoint_url("https://collector:4317").is_err());
        assert!(endpoint_url("http://").is_err());
    }
}
