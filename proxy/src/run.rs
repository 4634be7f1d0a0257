//! `weft-proxy run`: identity, discovery, the data path and the admin endpoint, wired
//! together, and the shutdown sequence.
//!
//! Start-up: read and template the Dataplane; start the admin endpoint (loopback); start the
//! identity client (it retries until the dataplane is registered); connect discovery. The first
//! snapshot starts the data path; later ones are applied to it. A change of the mesh's mTLS
//! backend or trust bundle asks identity to re-certify at once.
//!
//! Telemetry: one [`Telemetry`] handle lives for the whole run; its metrics (and `process_*`)
//! are in the same registry as everything else. Each snapshot that converts cleanly first
//! updates it (label set, tracing and access-log backends) and the mesh's Prometheus endpoint
//! ([`PromServer`]: bound, moved or closed per the metrics backend), then goes to the data
//! path as a [`ProxyConfig`] that carries the handle (`config.telemetry`). A telemetry backend
//! that cannot be used is logged and left off; it does not NACK the snapshot.
//!
//! Shutdown (SIGTERM/SIGINT or `POST /drain`): end the discovery stream cleanly at once, so
//! the control plane deregisters this proxy and the other proxies stop picking it for new
//! connections; stop accepting and fail `/ready`; let in-flight connections finish within the
//! drain window; exit.

use crate::admin::Admin;
use crate::datapath::{DataPath, DataPathOptions};
use crate::datapath_metrics::DataPathMetrics;
use crate::discovery::{Apply, Discovery, StatsSource, render_template};
use crate::drain::{Drain, DrainOutcome};
use crate::identity::{Identity, IdentityConfig, TokenSource};
use crate::metrics::Metrics;
use crate::telemetry::prom_server::PromServer;
use crate::telemetry::{Telemetry, TelemetrySettings};
use crate::tls::IdentityTls;
use crate::{ProxyConfig, mesh_tls::MeshTls};
use axum::routing::{get, post};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use weft_api::proto::Snapshot;

/// Everything `weft-proxy run` is told.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The control plane's dataplane server, `https://HOST:5678`.
    pub cp_address: String,
    /// The control plane's CA (`<data-dir>/cp-ca.pem` of the control plane).
    pub ca_cert_file: PathBuf,
    /// The Dataplane resource (a template when `dataplane_vars` are given).
    pub dataplane_file: PathBuf,
    /// `--dataplane-var key=value` pairs.
    pub dataplane_vars: Vec<(String, String)>,
    /// The dataplane token.
    pub token_file: PathBuf,
    /// Admin endpoint address (loopback).
    pub admin_address: SocketAddr,
    /// How long in-flight connections may take to finish on shutdown.
    pub drain_time: Duration,
    /// How often the proxy reports its traffic totals to the control plane.
    pub stats_interval: Duration,
    /// Data-path options (detection timeout, …).
    pub options: DataPathOptions,
}

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad input: a file, the Dataplane, a flag. Exit 1.
    #[error("{0}")]
    Invalid(String),
    /// A port could not be bound. Exit 2.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads, templates and validates the Dataplane file; returns its text, mesh and name.
pub fn load_dataplane(cfg: &RunConfig) -> Result<(String, String, String), RunError> {
    let file = cfg.dataplane_file.display().to_string();
    let template = std::fs::read_to_string(&cfg.dataplane_file)
        .map_err(|e| RunError::Invalid(format!("{file}: {e}")))?;
    let text = render_template(&template, &cfg.dataplane_vars)
        .map_err(|e| RunError::Invalid(format!("{file}: {e}")))?;
    let mut docs = weft_api::parse::parse_documents(&text)
        .map_err(|e| RunError::Invalid(format!("{file}: {e}")))?;
    if docs.len() != 1 || docs[0].resource.resource_type() != weft_api::ResourceType::Dataplane {
        return Err(RunError::Invalid(format!(
            "{file}: expected exactly one Dataplane"
        )));
    }
    let r = docs.remove(0).resource;
    Ok((text, r.mesh_name().to_string(), r.name))
}

/// Runs the proxy until it is told to stop; returns how the drain ended.
pub async fn run(cfg: RunConfig) -> Result<DrainOutcome, RunError> {
    crate::tls::install_default_crypto_provider();
    // The admin endpoint answers without authentication, `POST /drain` included: only the
    // proxy's own host may reach it.
    if !cfg.admin_address.ip().to_canonical().is_loopback() {
        return Err(RunError::Invalid(format!(
            "--admin-address {} is not a loopback address: the admin endpoint (/config, \
             /certs, POST /drain) has no authentication, so it binds to loopback only \
             (e.g. 127.0.0.1:9901)",
            cfg.admin_address
        )));
    }
    let (dataplane, mesh, name) = load_dataplane(&cfg)?;
    let ca = std::fs::read(&cfg.ca_cert_file).map_err(|e| {
        RunError::Invalid(format!(
            "--ca-cert-file {}: {e}",
            cfg.ca_cert_file.display()
        ))
    })?;
    let token = TokenSource::File(cfg.token_file.clone());
    std::fs::metadata(&cfg.token_file).map_err(|e| {
        RunError::Invalid(format!(
            "--dataplane-token-file {}: {e}",
            cfg.token_file.display()
        ))
    })?;

    let dp_metrics = DataPathMetrics::new();
    let telemetry = Telemetry::new();
    let metrics = Arc::new(Metrics::with_extra(|r| {
        dp_metrics.register(r);
        telemetry.register(r);
    }));
    let prom = {
        let metrics = metrics.clone();
        PromServer::new(move || metrics.encode())
    };
    let identity = Identity::new(
        IdentityConfig::new(&cfg.cp_address, ca, &mesh, &name, token.clone()),
        metrics.clone(),
    );
    let replicas = identity
        .channels()
        .map_err(|e| RunError::Invalid(e.to_string()))?;
    // The data path counts connections and bytes; the L7 layer's telemetry counts requests.
    let stats: Arc<dyn StatsSource> = {
        let dp_metrics = dp_metrics.clone();
        let telemetry = telemetry.clone();
        Arc::new(move || {
            let (requests, errors) = telemetry.totals();
            let mut stats = dp_metrics.stats();
            stats.requests_total = requests;
            stats.request_errors_total = errors;
            stats
        })
    };
    let discovery = Arc::new(
        Discovery::new(replicas, dataplane, token, metrics.clone())
            .with_stats(stats, cfg.stats_interval),
    );
    let applied = discovery.applied();
    let drain = Drain::new();
    let stop = CancellationToken::new();

    let admin = {
        let applied = applied.clone();
        let drain = drain.clone();
        Admin::new(identity.clone(), metrics.clone())
            .with_ready_check("config", move || applied.borrow().is_some())
            .with_ready_check("not-draining", move || !drain.is_draining())
    };
    let config_view = applied.clone();
    let drain_stop = stop.clone();
    let router = admin
        .router()
        .route(
            "/config",
            get(move || {
                let snap = config_view.borrow().clone();
                async move {
                    match snap {
                        Some(s) => axum::Json(serde_json::to_value(&*s).unwrap_or_default())
                            .into_response_ok(),
                        None => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "no configuration yet\n",
                        )
                            .into_response_ok(),
                    }
                }
            }),
        )
        .route(
            "/drain",
            post(move || {
                drain_stop.cancel();
                async { "draining\n" }
            }),
        );
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_address)
        .await
        .map_err(|source| RunError::Bind {
            addr: cfg.admin_address,
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, router).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });
    tracing::info!(admin = %cfg.admin_address, %mesh, %name, "weft-proxy starting");
    let identity_task = identity.spawn();

    let tls: Arc<dyn MeshTls> = Arc::new(IdentityTls::new(identity.cert().clone()));
    let datapath: Arc<Mutex<Option<DataPath>>> = Arc::new(Mutex::new(None));
    let last_trust: Arc<Mutex<Option<CertBasis>>> = Arc::new(Mutex::new(None));
    // The telemetry settings of the snapshot in force, to go back to when a new one is
    // refused (all of a snapshot applies, or none of it).
    let in_force: Arc<Mutex<TelemetrySettings>> = Arc::new(Mutex::new(Default::default()));
    let apply: Apply = {
        let datapath = datapath.clone();
        let identity = identity.clone();
        let drain = drain.clone();
        let options = cfg.options.clone();
        Arc::new(move |snap: &Snapshot| {
            let mut dp = datapath
                .lock()
                .map_err(|_| "data path lock poisoned".to_string())?;
            let config = match dp.as_ref() {
                Some(running) => ProxyConfig::from_snapshot_with(snap, &running.endpoint_states()),
                None => ProxyConfig::from_snapshot(snap),
            }
            .map_err(|e| e.to_string())?
            .with_telemetry(telemetry.clone());
            // Before the data path, so its new connections find the new services' series.
            let settings = TelemetrySettings::from_snapshot(snap);
            if let Err(e) = telemetry.apply(&settings) {
                tracing::warn!(error = %e, "telemetry backend not applied (left off)");
            }
            let started = match dp.as_ref() {
                Some(running) => running.apply(config).map_err(|e| e.to_string()),
                None => DataPath::start(
                    config,
                    tls.clone(),
                    dp_metrics.clone(),
                    drain.clone(),
                    options.clone(),
                )
                .map(|started| *dp = Some(started))
                .map_err(|e| e.to_string()),
            };
            let mut in_force = in_force
                .lock()
                .map_err(|_| "telemetry settings lock poisoned".to_string())?;
            if let Err(e) = started {
                // Refused: the telemetry of the snapshot in force comes back too.
                let _ = telemetry.apply(&in_force);
                return Err(e);
            }
            *in_force = settings;
            // After the data path took the snapshot: moving the endpoint back after a refusal
            // could find its old port not yet given up by the server just stopped.
            let backend = snap.mesh.as_ref().and_then(|m| m.metrics.as_ref());
            if let Err(e) = prom.apply(backend) {
                tracing::warn!(error = %e, "mesh prometheus endpoint not served");
            }
            // Re-certify when what the certificate rests on changes: the mesh's CA, or the
            // services of the dataplane (its identities; the control plane names them in
            // the certificate); and once the dataplane is registered.
            let trust = CertBasis::of(snap);
            if let Ok(mut last) = last_trust.lock()
                && last.as_ref() != Some(&trust)
            {
                *last = Some(trust);
                identity.renew_now();
            }
            Ok(())
        })
    };
    let discovery_task = {
        let discovery = discovery.clone();
        let stop = stop.clone();
        tokio::spawn(async move { discovery.run(apply, stop).await })
    };

    let signal_stop = stop.clone();
    tokio::spawn(async move {
        if crate::drain::shutdown_signal().await.is_ok() {
            signal_stop.cancel();
        }
    });
    stop.cancelled().await;
    tracing::info!(window = ?cfg.drain_time, "draining");
    let outcome = drain.drain(cfg.drain_time).await;
    tracing::info!(?outcome, "drained; deregistering");
    let _ = tokio::time::timeout(Duration::from_secs(5), discovery_task).await;
    identity_task.abort();
    Ok(outcome)
}

/// Small helper so both match arms of `/config` return one type.
trait IntoResponseOk {
    fn into_response_ok(self) -> axum::response::Response;
}

impl<T: axum::response::IntoResponse> IntoResponseOk for T {
    fn into_response_ok(self) -> axum::response::Response {
        self.into_response()
    }
}

/// What a proxy's certificate rests on: a change in any of it calls for a new certificate.
#[derive(Debug, PartialEq, Eq)]
struct CertBasis {
    /// The mesh's enabled mTLS backend.
    backend: String,
    /// The mesh's CA certificates.
    trust_bundle_pem: String,
    /// The services of the dataplane's inbounds, sorted: its SPIFFE identities.
    services: Vec<String>,
}

impl CertBasis {
    fn of(snap: &weft_api::proto::Snapshot) -> Self {
        let mtls = snap.mesh.as_ref().and_then(|m| m.mtls.as_ref());
        let mut services: Vec<String> = snap.inbounds.iter().map(|i| i.service.clone()).collect();
        services.sort_unstable();
        services.dedup();
        Self {
            backend: mtls.map(|m| m.backend.clone()).unwrap_or_default(),
            trust_bundle_pem: snap.trust_bundle_pem.clone(),
            services,
        }
    }
}
