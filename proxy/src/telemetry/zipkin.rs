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
//! `remoteEndpoint` from `peer.service` and `network.peer.address`/`network.peer.port`; every
//! attribute becomes a string tag; an error status becomes the `error` tag.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use serde::Serialize;

use super::TelemetryError;

/// Exports spans to a Zipkin v2 HTTP endpoint.
pub struct ZipkinExporter {
    client: Client<HttpConnector, Full<Bytes>>,
    url: http::Uri,
    local_service: String,
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
    /// An exporter posting to `url` (`http://…`) for spans of `local_service`.
    pub fn new(url: &str, local_service: &str) -> Result<Self, TelemetryError> {
        let bad = |reason: &str| TelemetryError::Backend {
            backend: "zipkin",
            reason: format!("{url:?}: {reason}"),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("https is not supported; use http")),
            _ => return Err(bad("expected an http:// URL")),
        }
        if uri.host().is_none() {
            return Err(bad("has no host"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            url: uri,
            local_service: local_service.to_string(),
        })
    }
}

impl SpanExporter for ZipkinExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans: Vec<ZipkinSpan<'_>> = batch
            .iter()
            .map(|s| ZipkinSpan::from_span(s, &self.local_service))
            .collect();
        let body = serde_json::to_vec(&spans)
            .map_err(|e| OTelSdkError::InternalFailure(format!("zipkin json: {e}")))?;
        let request = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| OTelSdkError::InternalFailure(format!("zipkin request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| OTelSdkError::InternalFailure(format!("zipkin post: {e}")))?;
        let status = response.status();
        // Read the (small) body so the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(OTelSdkError::InternalFailure(format!(
                "zipkin answered {status}"
            )))
        }
    }
}

/// One span in Zipkin's v2 JSON model.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    timestamp: u64,
    duration: u64,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    tags: Tags<'a>,
}

/// A span's tags, serialized as a JSON object in attribute order. A plain list instead of a
/// `serde_json::Map`: building that map (an ordered, hashed map of owned strings) per span was
/// the exporter's largest cost.
#[derive(Debug, Default)]
struct Tags<'a>(Vec<(&'a str, Cow<'a, str>)>);

impl Serialize for Tags<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A Zipkin endpoint.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn text(v: &Value) -> String {
    v.as_str().into_owned()
}

fn find<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

impl<'a> ZipkinSpan<'a> {
    /// Converts an OpenTelemetry span.
    pub fn from_span(span: &'a SpanData, local_service: &'a str) -> Self {
        let sc = &span.span_context;
        let attrs = &span.attributes;
        let mut tags = Tags(Vec::with_capacity(attrs.len() + 1));
        for kv in attrs {
            tags.0.push((kv.key.as_str(), kv.value.as_str()));
        }
        if let Status::Error { description } = &span.status {
            let d: Cow<'a, str> = if description.is_empty() {
                Cow::Borrowed("true")
            } else {
                Cow::Borrowed(description.as_ref())
            };
            tags.0.push(("error", d));
        }
        let remote = {
            let mut e = Endpoint {
                service_name: match find(attrs, "peer.service") {
                    Some(Value::String(s)) => Some(s.as_str()),
                    _ => None,
                },
                ..Endpoint::default()
            };
            if let Some(Ok(ip)) =
                find(attrs, "network.peer.address").map(|v| text(v).parse::<std::net::IpAddr>())
            {
                match ip {
                    std::net::IpAddr::V4(a) => e.ipv4 = Some(a.to_string()),
                    std::net::IpAddr::V6(a) => e.ipv6 = Some(a.to_string()),
                }
                e.port = match find(attrs, "network.peer.port") {
                    Some(Value::I64(p)) => u16::try_from(*p).ok(),
                    _ => None,
                };
            }
            (e.service_name.is_some() || e.ipv4.is_some() || e.ipv6.is_some()).then_some(e)
        };
        let duration = span
            .end_time
            .duration_since(span.start_time)
            .unwrap_or_default();
        ZipkinSpan {
            trace_id: sc.trace_id().to_string(),
            id: sc.span_id().to_string(),
            parent_id: (span.parent_span_id != SpanId::INVALID)
                .then(|| span.parent_span_id.to_string()),
            name: &span.name,
            kind: match span.span_kind {
                SpanKind::Client => Some("CLIENT"),
                SpanKind::Server => Some("SERVER"),
                SpanKind::Producer => Some("PRODUCER"),
                SpanKind::Consumer => Some("CONSUMER"),
                SpanKind::Internal => None,
            },
            timestamp: micros(span.start_time),
            // Zipkin treats 0 as "unknown"; a finished span lasted at least a microsecond.
            duration: u64::try_from(duration.as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
            local_endpoint: Endpoint {
                service_name: Some(local_service),
                ..Endpoint::default()
            },
            remote_endpoint: remote,
            tags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_urls_it_cannot_post_to() {
        for url in ["", "jaeger:9411", "https://jaeger/api/v2/spans", "ftp://x/"] {
            assert!(ZipkinExporter::new(url, "web").is_err(), "{url}");
        }
        assert!(ZipkinExporter::new("http://127.0.0.1:9411/api/v2/spans", "web").is_ok());
    }
}
