//! The admin endpoint (loopback only, default `127.0.0.1:9901`): `/live`,
//! `/ready`, `/certs` and `/metrics`.
//!
//! `/ready` answers 200 only when every readiness condition holds: a valid mesh
//! certificate (or a mesh with mTLS off), plus whatever other modules add with
//! [`Admin::with_ready_check`] (discovery adds "a config is held").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::identity::Identity;
use crate::metrics::Metrics;

/// Default admin address.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";

type Check = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the admin endpoint reports on.
#[derive(Clone)]
pub struct Admin {
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    checks: Vec<(&'static str, Check)>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field(
                "checks",
                &self.checks.iter().map(|c| c.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// One certificate, as `/certs` shows it.
#[derive(Debug, Serialize)]
pub struct CertInfo {
    /// Mesh.
    pub mesh: String,
    /// mTLS backend that signed it.
    pub backend: String,
    /// Subject (usually empty).
    pub subject: String,
    /// URI SANs.
    pub sans: Vec<String>,
    /// Serial, hex.
    pub serial: String,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: u64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: u64,
    /// Whether it is valid now.
    pub valid: bool,
}

impl Admin {
    /// Reports on `identity` and exposes `metrics`.
    pub fn new(identity: Arc<Identity>, metrics: Arc<Metrics>) -> Self {
        Self {
            identity,
            metrics,
            checks: Vec::new(),
        }
    }

    /// Adds a readiness condition named `name`.
    pub fn with_ready_check(
        mut self,
        name: &'static str,
        check: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((name, Arc::new(check)));
        self
    }

    /// The names of the readiness conditions that do not hold now.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.identity.is_ready() {
            missing.push("certificate");
        }
        missing.extend(self.checks.iter().filter(|(_, c)| !c()).map(|(n, _)| *n));
        missing
    }

    /// The current certificate, if any.
    pub fn cert_info(&self) -> Option<CertInfo> {
        let c = self.identity.current()?;
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        Some(CertInfo {
            mesh: c.mesh.clone(),
            backend: c.backend.clone(),
            subject: c.subject.clone(),
            sans: c.uri_sans.clone(),
            serial: c.serial.clone(),
            not_before: secs(c.not_before),
            not_after: secs(c.not_after),
            valid: c.is_valid_at(SystemTime::now()),
        })
    }

    /// The axum router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/live", get(|| async { "live\n" }))
            .route("/ready", get(ready))
            .route("/certs", get(certs))
            .route("/metrics", get(metrics))
            .with_state(self)
    }

    /// Binds `addr` and serves in a background task; returns the bound address.
    pub async fn serve(
        self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let router = self.router();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "admin server stopped");
            }
        });
        Ok((local, task))
    }
}

async fn ready(State(admin): State<Admin>) -> Response {
    let missing = admin.not_ready();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", missing.join(", ")),
        )
            .into_response()
    }
}

async fn certs(State(admin): State<Admin>) -> Response {
    let body =
        serde_json::json!({ "certificates": admin.cert_info().into_iter().collect::<Vec<_>>() });
    axum::Json(body).into_response()
}

async fn metrics(State(admin): State<Admin>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.encode(),
    )
        .into_response()
}
