//! The mesh's own settings as a proxy sees them: mTLS, passthrough, observability backends.

use super::super::view::MeshView;
use weft_api::duration::parse_duration;
use weft_api::mesh::{CaBackendType, LoggingBackendType, MtlsMode, TracingBackendType};
use weft_api::proto::{self as pb, mtls::Mode};

/// Default lifetime of a proxy certificate (Kuma's code default).
pub const DEFAULT_CERT_LIFETIME_SECS: u64 = 24 * 3600;

/// The `MeshSettings` of `mesh`.
pub(super) fn mesh_settings(mesh: &str, view: &MeshView) -> pb::MeshSettings {
    let spec = &view.spec;
    let mtls = match spec.enabled_mtls_backend() {
        Some(b) => pb::Mtls {
            enabled: true,
            backend: b.name.clone(),
            backend_type: match b.kind {
                CaBackendType::Builtin => "builtin",
                CaBackendType::Provided => "provided",
            }
            .into(),
            mode: match b.mode() {
                MtlsMode::Strict => Mode::Strict,
                MtlsMode::Permissive => Mode::Permissive,
            } as i32,
            cert_lifetime_seconds: b
                .dp_cert
                .as_ref()
                .and_then(|d| d.rotation.as_ref())
                .and_then(|r| r.expiration.as_deref())
                .and_then(|e| parse_duration(e).ok())
                .map(|d| d.as_secs())
                .unwrap_or(DEFAULT_CERT_LIFETIME_SECS),
        },
        None => pb::Mtls::default(),
    };
    let metrics = spec.metrics.as_ref().and_then(|m| {
        let name = m.enabled_backend.as_deref().filter(|n| !n.is_empty())?;
        let b = m.backends.iter().find(|b| b.name == name)?;
        let conf = b.conf.clone().unwrap_or_default();
        Some(pb::MetricsBackend {
            enabled: true,
            name: name.into(),
            port: conf.port.unwrap_or(5670),
            path: conf.path.unwrap_or_else(|| "/metrics".into()),
            skip_mtls: conf.skip_mtls.unwrap_or(false),
        })
    });
    let tracing = spec.tracing.as_ref().and_then(|t| {
        let b = match t.default_backend.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => t.backends.iter().find(|b| b.name == name)?,
            None => t.backends.first()?,
        };
        let conf = b.conf.clone().unwrap_or_default();
        let endpoint = match b.kind {
            TracingBackendType::Zipkin => conf.url,
            TracingBackendType::Opentelemetry => conf.endpoint,
        };
        Some(pb::TracingBackend {
            enabled: true,
            name: b.name.clone(),
            backend_type: b.kind.name().into(),
            endpoint: endpoint.unwrap_or_default(),
            sampling: b.sampling.unwrap_or(100.0),
        })
    });
    let logging = spec.logging.as_ref().and_then(|l| {
        let b = match l.default_backend.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => l.backends.iter().find(|b| b.name == name)?,
            None => l.backends.first()?,
        };
        let conf = b.conf.clone().unwrap_or_default();
        let (kind, dest) = match b.kind {
            LoggingBackendType::File => ("file", conf.path),
            LoggingBackendType::Tcp => ("tcp", conf.address),
        };
        Some(pb::LoggingBackend {
            enabled: true,
            name: b.name.clone(),
            backend_type: kind.into(),
            destination: dest.unwrap_or_default(),
        })
    });
    pb::MeshSettings {
        name: mesh.into(),
        mtls: Some(mtls),
        passthrough: spec.passthrough(),
        metrics,
        tracing,
        logging,
    }
}
