//! Observability of the traffic the proxy carries: request metrics, traces and access logs,
//! configured by the mesh (each snapshot's `MeshSettings`) and recorded by the data path
//! through one cheap handle, [`Telemetry`].
//!
//! The L7 path calls [`Telemetry::begin`] when a request's head arrives and gets a
//! [`RequestObservation`]; it reports the response status with
//! [`RequestObservation::status`] and the end of the exchange with
//! [`RequestObservation::finish`] (dropping it unfinished records an aborted exchange). Opaque
//! TCP connections are reported with [`Telemetry::connection`] (access log only). Each
//! concern has its own file:
//! - [`requests`]: `weft_requests_total{direction,service,code}` and
//!   `weft_request_duration_seconds{direction,service}`, lock- and allocation-free on the
//!   request path.
//! - [`propagation`]: W3C `traceparent` (and B3 for zipkin) read and written.
//! - [`trace`]: spans (client on outbound, server on inbound), sampled by trace id and
//!   exported through a bounded queue to [`otlp`] (OTLP/gRPC) or [`zipkin`] (v2 JSON).
//! - [`span`]: the span record those exporters read: weft's own, not the OpenTelemetry SDK's
//!   (the module says why).
//! - [`access_log`]: JSON lines to a file or TCP backend through a bounded queue.
//! - [`prom_server`]: the mesh's Prometheus endpoint (default `:5670/metrics`).
//! - [`process`]: the standard `process_*` metrics.
//!
//! Nothing here can slow or fail traffic: exporters and writers run in their own tasks
//! behind bounded queues; what does not fit is dropped and counted.
//!
//! # Span attributes
//! Span name: the HTTP method. OTel HTTP semantic conventions: `http.request.method`,
//! `url.path`, `url.scheme`, `server.address`/`server.port` (from the URI's authority or
//! `Host`), `http.response.status_code`, `network.peer.address`/`network.peer.port` (when the
//! data path gives [`RequestObservation::peer_address`]), `error.type` (the status code for
//! errors, `transport` or `aborted` when no status was sent), `peer.service`. weft's own:
//! `weft.mesh`, `weft.direction` (`outbound`/`inbound`), `weft.service` (the destination
//! service on outbound, the local inbound service on inbound). Resource: `service.name` = the
//! proxy's `kuma.io/service` (its first inbound's), `weft.mesh`.

pub mod access_log;
mod observation;
pub mod otlp;
pub mod process;
pub mod prom_server;
pub mod propagation;
pub mod requests;
pub mod span;
pub mod trace;
pub mod zipkin;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use weft_api::proto::{LoggingBackend, Snapshot, TracingBackend};

use access_log::{AccessLog, AccessLogEntry, AccessLogMetrics, Destination};
use requests::{HandleTable, RequestMetrics};
use trace::{TraceMetrics, Tracing};

pub use observation::RequestObservation;

/// Which side of the proxy an exchange went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the local app to a mesh service (client spans).
    Outbound = 0,
    /// From a mesh peer to the local app (server spans).
    Inbound = 1,
}

impl Direction {
    /// `outbound` or `inbound`, as in metric labels and log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Why part of the telemetry configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A backend's settings are unusable.
    #[error("{backend} backend: {reason}")]
    Backend {
        /// `opentelemetry`, `zipkin`, `logging`, `prometheus`, `tracing`.
        backend: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The prometheus endpoint's port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Exporters and writers need a tokio runtime, and there is none on this thread.
    #[error("no tokio runtime to run exporters on")]
    NoRuntime,
    /// A lock was poisoned by a panic elsewhere.
    #[error("telemetry state lock poisoned")]
    Poisoned,
    /// More than one part failed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<TelemetryError>),
}

/// Queue sizes and export pacing.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    /// Finished spans waiting for export; more are dropped.
    pub trace_queue: usize,
    /// Spans per export call.
    pub trace_batch: usize,
    /// How long a partial batch waits for more spans.
    pub export_interval: Duration,
    /// Longest one export call may take.
    pub export_timeout: Duration,
    /// Access-log lines waiting for the writer; more are dropped.
    pub log_queue: usize,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        Self {
            trace_queue: 4096,
            trace_batch: 512,
            export_interval: Duration::from_secs(1),
            export_timeout: Duration::from_secs(10),
            log_queue: 8192,
        }
    }
}

/// What a snapshot says about telemetry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetrySettings {
    /// The mesh.
    pub mesh: String,
    /// This proxy's `kuma.io/service` (`service.name` of its spans).
    pub service: String,
    /// Every service that may appear as a metric label (inbound and outbound).
    pub services: Vec<String>,
    /// The tracing backend in force, if any.
    pub tracing: Option<TracingBackend>,
    /// The access-log backend in force, if any.
    pub logging: Option<LoggingBackend>,
}

impl TelemetrySettings {
    /// Reads a snapshot: the service is the first inbound's (the dataplane's name when it has
    /// none); the label set is every inbound and outbound service.
    pub fn from_snapshot(snap: &Snapshot) -> Self {
        let dp = snap.dataplane.as_ref();
        let mesh_settings = snap.mesh.as_ref();
        let mesh = mesh_settings
            .map(|m| m.name.clone())
            .filter(|m| !m.is_empty())
            .or_else(|| dp.map(|d| d.mesh.clone()))
            .unwrap_or_default();
        let service = snap
            .inbounds
            .first()
            .map(|i| i.service.clone())
            .or_else(|| dp.map(|d| d.name.clone()))
            .unwrap_or_default();
        let mut services: Vec<String> = snap
            .inbounds
            .iter()
            .map(|i| i.service.clone())
            .chain(snap.outbounds.iter().map(|o| o.service.clone()))
            .filter(|s| !s.is_empty())
            .collect();
        services.sort();
        services.dedup();
        Self {
            mesh,
            service,
            services,
            tracing: mesh_settings
                .and_then(|m| m.tracing.clone())
                .filter(|t| t.enabled),
            logging: mesh_settings
                .and_then(|m| m.logging.clone())
                .filter(|l| l.enabled),
        }
    }
}

/// What the request path reads: swapped whole on each change.
struct State {
    mesh: Arc<str>,
    service: Arc<str>,
    table: Arc<HandleTable>,
    tracing: Option<Arc<Tracing>>,
    log: Option<AccessLog>,
}

struct Shared {
    options: TelemetryOptions,
    requests: RequestMetrics,
    trace_metrics: TraceMetrics,
    log_metrics: AccessLogMetrics,
    state: ArcSwap<State>,
    /// Serializes [`Telemetry::apply`] (never taken on the request path).
    apply: Mutex<()>,
}

/// The proxy's telemetry: cheap to clone (one `Arc`); every clone sees the configuration of
/// the latest [`Telemetry::apply`].
#[derive(Clone)]
pub struct Telemetry {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.state.load();
        f.debug_struct("Telemetry")
            .field("mesh", &s.mesh)
            .field("service", &s.service)
            .field("tracing", &s.tracing.as_ref().map(|t| t.settings()))
            .field("log", &s.log.as_ref().map(|l| l.destination()))
            .finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Telemetry with default options: metrics on (for no known service yet), tracing and
    /// access logs off until [`Telemetry::apply`] says otherwise.
    pub fn new() -> Self {
        Self::with_options(TelemetryOptions::default())
    }

    /// The same with `options`.
    pub fn with_options(options: TelemetryOptions) -> Self {
        let requests = RequestMetrics::default();
        let table = HandleTable::build(&requests, std::iter::empty::<&str>(), None);
        let state = State {
            mesh: Arc::from(""),
            service: Arc::from(""),
            table: Arc::new(table),
            tracing: None,
            log: None,
        };
        Self {
            shared: Arc::new(Shared {
                options,
                requests,
                trace_metrics: TraceMetrics::default(),
                log_metrics: AccessLogMetrics::default(),
                state: ArcSwap::from_pointee(state),
                apply: Mutex::new(()),
            }),
        }
    }

    /// Registers every telemetry metric, and the `process_*` collector, in `registry` (one
    /// without a prefix: the names are full).
    pub fn register(&self, registry: &mut Registry) {
        self.shared.requests.register(registry);
        self.shared.trace_metrics.register(registry);
        self.shared.log_metrics.register(registry);
        registry.register_collector(Box::new(process::ProcessCollector::new()));
    }

    /// Applies a snapshot's settings: the metric label set, and the tracing and access-log
    /// backends (rebuilt only when they change; observations already begun finish on the
    /// old ones). A backend that cannot be used is turned off and reported in the error;
    /// everything else is applied regardless. Call it inside a tokio runtime.
    pub fn apply(&self, settings: &TelemetrySettings) -> Result<(), TelemetryError> {
        let _serial = self
            .shared
            .apply
            .lock()
            .map_err(|_| TelemetryError::Poisoned)?;
        let current = self.shared.state.load_full();
        let mut errors = Vec::new();
        let services = settings.services.iter().map(String::as_str);
        let table = if current.table.same_services(services.clone()) {
            Arc::clone(&current.table)
        } else {
            Arc::new(HandleTable::build(
                &self.shared.requests,
                services,
                Some(&current.table),
            ))
        };
        let identity_same =
            *current.service == *settings.service && *current.mesh == *settings.mesh;
        let tracing = match &settings.tracing {
            Some(b) if b.enabled => match &current.tracing {
                Some(t) if identity_same && trace::same_backend(t.settings(), b) => {
                    Some(Arc::clone(t))
                }
                _ => match Tracing::new(
                    b,
                    &settings.service,
                    &settings.mesh,
                    &self.shared.options,
                    &self.shared.trace_metrics,
                ) {
                    Ok(t) => {
                        tracing::info!(backend = %b.name, kind = %b.backend_type,
                            endpoint = %b.endpoint, sampling = b.sampling, "tracing on");
                        Some(Arc::new(t))
                    }
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                },
            },
            _ => None,
        };
        let log = match &settings.logging {
            Some(b) if b.enabled => match Destination::from_backend(b) {
                Ok(dest) => match &current.log {
                    Some(l) if *l.destination() == dest => Some(l.clone()),
                    _ => {
                        match AccessLog::start(dest, &self.shared.options, &self.shared.log_metrics)
                        {
                            Ok(l) => {
                                tracing::info!(destination = ?l.destination(), "access log on");
                                Some(l)
                            }
                            Err(e) => {
                                errors.push(e);
                                None
                            }
                        }
                    }
                },
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
            _ => None,
        };
        self.shared.state.store(Arc::new(State {
            mesh: Arc::from(settings.mesh.as_str()),
            service: Arc::from(settings.service.as_str()),
            table,
            tracing,
            log,
        }));
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(TelemetryError::Several(errors)),
        }
    }

    /// Starts observing one HTTP request. `service` is the destination service (outbound)
    /// or the local inbound service (inbound); `peer_service` the other side's service when
    /// known. With tracing on, reads the caller's trace context from `headers` (W3C
    /// `traceparent`; B3 single and multi too for zipkin), starts a client (outbound) or
    /// server (inbound) span as its child (or a new root when there is none or it is
    /// malformed), sampled by the backend's percentage (decided by trace id, so every proxy
    /// of the mesh agrees: see [`trace`]), and rewrites `headers` so the forwarded request
    /// carries the new span as its parent. With
    /// tracing off, `headers` are left alone. With tracing and logging off, this allocates
    /// nothing and takes no lock.
    pub fn begin(
        &self,
        direction: Direction,
        service: &str,
        peer_service: Option<&Arc<str>>,
        method: &http::Method,
        uri: &http::Uri,
        headers: &mut http::HeaderMap,
    ) -> RequestObservation {
        let state = self.shared.state.load();
        let handles = Arc::clone(state.table.get(direction, service));
        let start = Instant::now();
        if state.tracing.is_none() && state.log.is_none() {
            return RequestObservation::metrics_only(handles, start);
        }
        observation::begin(
            handles,
            start,
            observation::Begin {
                direction,
                mesh: &state.mesh,
                local_service: &state.service,
                service,
                peer_service,
                method,
                uri,
                headers,
                tracing: state.tracing.as_deref(),
                log: state.log.as_ref(),
            },
        )
    }

    /// One opaque TCP connection ended: writes its access-log line (nothing else is
    /// recorded per connection here). `bytes_sent` flowed from the downstream to the
    /// upstream.
    #[allow(clippy::too_many_arguments)]
    pub fn connection(
        &self,
        direction: Direction,
        service: &str,
        peer_service: Option<&str>,
        start: SystemTime,
        duration: Duration,
        bytes_sent: u64,
        bytes_received: u64,
    ) {
        let state = self.shared.state.load();
        let Some(log) = &state.log else { return };
        let (source, destination) = observation::endpoints(
            direction,
            &state.service,
            service,
            peer_service.map(Arc::from),
        );
        log.send(AccessLogEntry {
            start_time: start,
            duration_ms: duration,
            direction: direction.as_str(),
            protocol: "tcp",
            mesh: Arc::clone(&state.mesh),
            source_service: source,
            destination_service: destination,
            method: None,
            path: None,
            status: None,
            bytes_sent,
            bytes_received,
            trace_id: None,
            peer_address: None,
            error: None,
        });
    }

    /// Totals for the discovery stats report: `(requests_total, request_errors_total)`. An
    /// error is a request that got no status (transport failure or abort), a 5xx, or one
    /// finished with an error.
    pub fn totals(&self) -> (u64, u64) {
        self.shared.requests.totals.get()
    }

    /// The span pipeline's counters.
    pub fn trace_metrics(&self) -> &TraceMetrics {
        &self.shared.trace_metrics
    }

    /// The access log's counters.
    pub fn access_log_metrics(&self) -> &AccessLogMetrics {
        &self.shared.log_metrics
    }

    /// Whether tracing is on (a usable backend is configured).
    pub fn tracing_enabled(&self) -> bool {
        self.shared.state.load().tracing.is_some()
    }

    /// Whether access logging is on.
    pub fn access_log_enabled(&self) -> bool {
        self.shared.state.load().log.is_some()
    }
}

/// An error and its causes, `: `-separated. The exporters' clients name only their own layer
/// (tonic: "transport error", hyper-util: "client error (Connect)"), and the cause, say a
/// refused connection, is what an operator needs in the log.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests;
