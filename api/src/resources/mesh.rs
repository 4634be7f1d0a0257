//! The `Mesh` resource: the parent of every other resource, with its mTLS backends,
//! passthrough switch and observability backends (Kuma's `api/mesh/v1alpha1/mesh.proto`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The body of a `Mesh`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    /// Mutual TLS between the mesh's proxies; absent or without `enabledBackend` means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Mesh-wide networking settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networking: Option<MeshNetworking>,
    /// Prometheus metrics backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Tracing backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// Access-log backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
}

impl MeshSpec {
    /// The enabled mTLS backend, if mTLS is on.
    pub fn enabled_mtls_backend(&self) -> Option<&CaBackend> {
        let mtls = self.mtls.as_ref()?;
        let name = mtls.enabled_backend.as_deref().filter(|n| !n.is_empty())?;
        mtls.backends.iter().find(|b| b.name == name)
    }

    /// Whether traffic to destinations outside the mesh is let through (Kuma's default: yes).
    pub fn passthrough(&self) -> bool {
        self.networking
            .as_ref()
            .and_then(|n| n.outbound.as_ref())
            .and_then(|o| o.passthrough)
            .unwrap_or(true)
    }
}

/// `mtls`: the CA backends and which one is enabled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mtls {
    /// Name of the backend in `backends` that is in force; empty means mTLS off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_backend: Option<String>,
    /// The CA backends the mesh may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<CaBackend>,
}

/// One CA backend of a mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaBackend {
    /// Backend name, unique within the mesh.
    pub name: String,
    /// `builtin` (weft generates the CA) or `provided` (the user's CA).
    #[serde(rename = "type")]
    pub kind: CaBackendType,
    /// `STRICT` (mTLS only; Kuma's default) or `PERMISSIVE` (plaintext accepted too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
    /// Lifetime of the certificates issued to proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_cert: Option<DpCert>,
    /// Backend-specific configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<CaConf>,
}

impl CaBackend {
    /// The backend's mode, defaulting to `STRICT` as Kuma does.
    pub fn mode(&self) -> MtlsMode {
        self.mode.unwrap_or(MtlsMode::Strict)
    }
}

/// Where a mesh CA comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaBackendType {
    /// weft generates and keeps the CA.
    Builtin,
    /// The user supplies the CA certificate and key.
    Provided,
}

/// Whether a proxy's inbound also accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mesh mTLS is accepted.
    Strict,
    /// Mesh mTLS and plaintext are both accepted.
    Permissive,
}

/// `dpCert`: proxy certificate settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DpCert {
    /// `rotation.expiration`: certificate lifetime (default `24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
}

/// `dpCert.rotation`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rotation {
    /// Lifetime of an issued certificate, as a duration (`24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
}

/// `conf` of a CA backend: `caCert` for builtin, `cert`/`key` for provided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaConf {
    /// builtin: the generated CA's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<CaCertConf>,
    /// provided: the CA certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<DataSource>,
    /// provided: the CA private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<DataSource>,
}

/// builtin `conf.caCert`. weft's CAs are ECDSA P-256, so Kuma's `RSAbits` is not accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaCertConf {
    /// CA validity (default `10y`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
}

/// Kuma's DataSource: exactly one of `file`, `inline` (base64) or `inlineString`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataSource {
    /// A path on the control plane's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The content, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// The content as a plain string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline_string: Option<String>,
}

/// `networking` of a mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshNetworking {
    /// Outbound settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<MeshOutbound>,
}

/// `networking.outbound` of a mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshOutbound {
    /// Whether traffic to non-mesh destinations is let through (unset means true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<bool>,
}

/// `metrics` of a mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metrics {
    /// The backend in force; empty means no metrics endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_backend: Option<String>,
    /// Metrics backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<MetricsBackend>,
}

/// A metrics backend; only `prometheus` exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsBackend {
    /// Backend name.
    pub name: String,
    /// Backend type.
    #[serde(rename = "type")]
    pub kind: MetricsBackendType,
    /// Scrape endpoint settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PrometheusConf>,
}

/// Metrics backend types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsBackendType {
    /// Prometheus text exposition on a port of each proxy.
    Prometheus,
}

/// `conf` of a prometheus backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrometheusConf {
    /// Port of the scrape endpoint (default 5670).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Path of the scrape endpoint (default `/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Serve the endpoint without mTLS.
    #[serde(default, rename = "skipMTLS", skip_serializing_if = "Option::is_none")]
    pub skip_mtls: Option<bool>,
    /// Tags added to the scrape target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// `tracing` of a mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tracing {
    /// The backend in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_backend: Option<String>,
    /// Tracing backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<TracingBackend>,
}

/// A tracing backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingBackend {
    /// Backend name.
    pub name: String,
    /// `zipkin` or `opentelemetry`.
    #[serde(rename = "type")]
    pub kind: TracingBackendType,
    /// Percentage of requests traced, 0–100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<f64>,
    /// Where spans go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<TracingConf>,
}

/// Tracing backend types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TracingBackendType {
    /// Zipkin v2 JSON over HTTP.
    Zipkin,
    /// OTLP over gRPC.
    Opentelemetry,
}

impl TracingBackendType {
    /// The type's name as in a resource and in a snapshot's `backend_type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zipkin => "zipkin",
            Self::Opentelemetry => "opentelemetry",
        }
    }

    /// The type called `name` (see [`Self::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Zipkin, Self::Opentelemetry]
            .into_iter()
            .find(|t| t.name() == name)
    }

    /// The URL a proxy exports to, from a backend's collector address, or why there is none.
    /// One rule for both sides: the control plane refuses a mesh whose address fails it, and
    /// the proxy builds its exporter from what it returns. Zipkin takes an `http://` URL;
    /// OpenTelemetry takes Kuma's `host:port` (IPv6 in brackets) or an `http://` URL. The
    /// exporters have no TLS client yet, so `https://` is refused.
    pub fn collector_url(self, address: &str) -> Result<http::Uri, String> {
        let a = address.trim();
        let expected = match self {
            Self::Zipkin => "an http:// URL",
            Self::Opentelemetry => "host:port or an http:// URL",
        };
        let bad = || format!("{address:?} is not {expected}");
        if a.starts_with("https://") {
            return Err(format!(
                "{address:?}: https is not supported yet; use http://"
            ));
        }
        let bare = self == Self::Opentelemetry && !a.contains("://");
        let url = if bare {
            format!("http://{a}")
        } else {
            a.to_string()
        };
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
            return Err(bad());
        }
        let port_ok = match uri.port() {
            Some(p) => p.as_str().parse::<u16>().is_ok_and(|p| p > 0),
            // `host:port` needs its port; a URL has a default one.
            None => !bare,
        };
        let has_path = uri.path_and_query().is_some_and(|p| p.as_str() != "/");
        if !port_ok || (bare && has_path) {
            return Err(bad());
        }
        Ok(uri)
    }
}

/// `conf` of a tracing backend: `url` for zipkin, `endpoint` for opentelemetry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingConf {
    /// zipkin: the v2 spans URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// opentelemetry: the OTLP/gRPC endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// `logging` of a mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Logging {
    /// The backend in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_backend: Option<String>,
    /// Access-log backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<LoggingBackend>,
}

/// An access-log backend. Envoy's `format` strings are not supported: weft writes JSON lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoggingBackend {
    /// Backend name.
    pub name: String,
    /// `file` or `tcp`.
    #[serde(rename = "type")]
    pub kind: LoggingBackendType,
    /// Where lines go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<LoggingConf>,
}

/// Access-log backend types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoggingBackendType {
    /// Append to a file.
    File,
    /// Send to a TCP address.
    Tcp,
}

/// `conf` of a logging backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoggingConf {
    /// file: the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// tcp: `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}
