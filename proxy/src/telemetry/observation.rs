//! One observed HTTP exchange: [`RequestObservation`], from `Telemetry::begin` to
//! [`RequestObservation::finish`] (or drop).
//!
//! With tracing and access logs off an observation is the service's metric handles, a start
//! instant and the status: creating and finishing it allocates nothing. The span and the
//! access-log fields live in a boxed [`Detail`] that exists only when one of them is on.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Method, Uri};
use opentelemetry::trace::TraceId;

use super::Direction;
use super::access_log::{AccessLog, AccessLogEntry};
use super::propagation;
use super::requests::ServiceHandles;
use super::span::{InlineStr, ServerName, SpanError, SpanKind, SpanRecord};
use super::trace::{SpanSink, Tracing};

/// An HTTP exchange being observed. `Send + 'static`; finishing it records the request
/// metrics, ends its span and writes its access-log line. Dropping it unfinished finishes it
/// as aborted (no bytes counted), so no exchange goes unrecorded.
pub struct RequestObservation {
    handles: Arc<ServiceHandles>,
    start: Instant,
    status: Option<u16>,
    peer: Option<SocketAddr>,
    done: bool,
    detail: Option<Box<Detail>>,
}

impl std::fmt::Debug for RequestObservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestObservation")
            .field("service", self.handles.service())
            .field("status", &self.status)
            .field("trace_id", &self.trace_id())
            .finish_non_exhaustive()
    }
}

impl RequestObservation {
    pub(super) fn metrics_only(handles: Arc<ServiceHandles>, start: Instant) -> Self {
        Self {
            handles,
            start,
            status: None,
            peer: None,
            done: false,
            detail: None,
        }
    }

    /// The response status is known (call when the response head is sent).
    pub fn status(&mut self, code: u16) {
        self.status = Some(code);
    }

    /// The other side's address (the downstream on inbound, the upstream endpoint on
    /// outbound), for `network.peer.address` and the access log.
    pub fn peer_address(&mut self, addr: SocketAddr) {
        self.peer = Some(addr);
    }

    /// The trace this exchange belongs to: its span's with tracing on; with only access logs
    /// on, the caller's (if it sent one); else `None`.
    pub fn trace_id(&self) -> Option<TraceId> {
        self.detail.as_ref().and_then(|d| d.trace_id)
    }

    /// The exchange is over (response body finished or aborted). Records
    /// `weft_requests_total{direction,service,code}` — `code` is the status passed to
    /// [`RequestObservation::status`], or `0` when none was (`error` should then say why) —
    /// and `weft_request_duration_seconds{direction,service}`, ends and exports the span, and
    /// writes the access-log line. `error` is a transport failure; with a status already
    /// sent, the code stays that status and the exchange counts as an error.
    pub fn finish(mut self, bytes_sent: u64, bytes_received: u64, error: Option<&str>) {
        self.complete(bytes_sent, bytes_received, error.map(Cow::Borrowed), false);
    }

    fn complete(&mut self, sent: u64, received: u64, error: Option<Cow<'_, str>>, aborted: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.start.elapsed();
        let code = self.status.unwrap_or(0);
        let failed = aborted || error.is_some() || code == 0 || code >= 500;
        self.handles.record(code, elapsed, failed);
        if let Some(detail) = self.detail.take() {
            detail.end(End {
                status: self.status,
                elapsed,
                sent,
                received,
                error,
                aborted,
                peer: self.peer,
            });
        }
    }
}

impl Drop for RequestObservation {
    fn drop(&mut self) {
        self.complete(0, 0, Some(Cow::Borrowed("aborted")), true);
    }
}

/// The source and destination services of a log line.
pub(super) fn endpoints(
    direction: Direction,
    local: &Arc<str>,
    service: &str,
    peer: Option<Arc<str>>,
) -> (Option<Arc<str>>, Option<Arc<str>>) {
    let local = (!local.is_empty()).then(|| Arc::clone(local));
    match direction {
        Direction::Outbound => (local, Some(Arc::from(service))),
        Direction::Inbound => (peer, Some(Arc::from(service))),
    }
}

/// What `Telemetry::begin` hands over when tracing or logging is on.
pub(super) struct Begin<'a> {
    pub direction: Direction,
    pub mesh: &'a Arc<str>,
    pub local_service: &'a Arc<str>,
    pub service: &'a str,
    pub peer_service: Option<&'a Arc<str>>,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a mut HeaderMap,
    pub tracing: Option<&'a Tracing>,
    pub log: Option<&'a AccessLog>,
}

struct End<'a> {
    status: Option<u16>,
    elapsed: std::time::Duration,
    sent: u64,
    received: u64,
    error: Option<Cow<'a, str>>,
    aborted: bool,
    peer: Option<SocketAddr>,
}

/// The span and access-log part of an observation.
pub(super) struct Detail {
    direction: Direction,
    start_time: SystemTime,
    span: Option<(SpanRecord, SpanSink)>,
    trace_id: Option<TraceId>,
    log: Option<(AccessLog, LogFields)>,
}

struct LogFields {
    mesh: Arc<str>,
    source: Option<Arc<str>>,
    destination: Option<Arc<str>>,
    method: String,
    path: String,
}

/// The span name and `http.request.method`: the method when it is a standard one, else
/// `_OTHER` (OTel semconv), so the set stays bounded.
fn method_name(m: &Method) -> &'static str {
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN
        .iter()
        .find(|(k, _)| k == m)
        .map_or("_OTHER", |(_, n)| n)
}

/// Where `server.address`/`server.port` come from: the URI's authority, else the `Host`
/// header.
fn server(uri: &Uri, headers: &HeaderMap) -> Option<ServerName> {
    match uri.authority() {
        Some(a) => Some(ServerName::from_authority(a)),
        None => ServerName::new(headers.get(http::header::HOST)?.as_bytes()),
    }
}

/// The span of a sampled exchange, as far as it is known when the request arrives.
fn record(
    b: &Begin<'_>,
    service: &Arc<str>,
    started: super::trace::Started,
    start: SystemTime,
) -> SpanRecord {
    let method = method_name(b.method);
    SpanRecord {
        trace_id: started.trace_id,
        span_id: started.span_id,
        parent_id: started.parent_id,
        kind: SpanKind::of(b.direction),
        method,
        method_original: (method == "_OTHER").then(|| b.method.as_str().into()),
        path: InlineStr::new(b.uri.path()),
        https: b.uri.scheme_str() == Some("https"),
        server: server(b.uri, b.headers),
        mesh: Arc::clone(b.mesh),
        service: Arc::clone(service),
        peer_service: b.peer_service.cloned(),
        start,
        duration: std::time::Duration::ZERO,
        status: None,
        peer: None,
        error: None,
    }
}

impl Detail {
    /// Starts the span (if tracing) and captures the log fields (if logging).
    pub(super) fn begin(
        handles: Arc<ServiceHandles>,
        start: Instant,
        b: Begin<'_>,
    ) -> RequestObservation {
        let start_time = SystemTime::now();
        let (span, trace_id) = match b.tracing {
            Some(t) => {
                let started = t.start(b.headers, b.direction == Direction::Inbound);
                let span = started.sampled.then(|| {
                    let r = record(&b, handles.service(), started, start_time);
                    (r, t.sink().clone())
                });
                (span, Some(started.trace_id))
            }
            None => (
                None,
                propagation::extract(b.headers, true).map(|e| e.trace_id),
            ),
        };
        let log = b.log.map(|l| {
            let (source, destination) = endpoints(
                b.direction,
                b.local_service,
                b.service,
                b.peer_service.cloned(),
            );
            let fields = LogFields {
                mesh: Arc::clone(b.mesh),
                source,
                destination,
                method: b.method.as_str().to_string(),
                path: b.uri.path().to_string(),
            };
            (l.clone(), fields)
        });
        let mut obs = RequestObservation::metrics_only(handles, start);
        obs.detail = Some(Box::new(Detail {
            direction: b.direction,
            start_time,
            span,
            trace_id,
            log,
        }));
        obs
    }

    fn end(self: Box<Self>, e: End<'_>) {
        let Detail {
            direction,
            start_time,
            span,
            trace_id,
            log,
        } = *self;
        if let Some((mut span, sink)) = span {
            span.duration = e.elapsed;
            span.status = e.status;
            span.peer = e.peer;
            // Semconv: 5xx is an error on both sides, 4xx on the client side only.
            let error_status = e.status.filter(|c| {
                *c >= 500 || (direction == Direction::Outbound && *c >= 400) || *c < 100
            });
            span.error = if let Some(err) = &e.error {
                Some(SpanError::Transport {
                    kind: if e.aborted { "aborted" } else { "transport" },
                    message: err.to_string(),
                })
            } else if let Some(code) = error_status {
                Some(SpanError::Status(code))
            } else if e.status.is_none() {
                Some(SpanError::NoResponse)
            } else {
                None
            };
            sink.send(span);
        }
        if let Some((log, f)) = log {
            log.send(AccessLogEntry {
                start_time,
                duration_ms: e.elapsed,
                direction: direction.as_str(),
                protocol: "http",
                mesh: f.mesh,
                source_service: f.source,
                destination_service: f.destination,
                method: Some(f.method),
                path: Some(f.path),
                status: e.status,
                bytes_sent: e.sent,
                bytes_received: e.received,
                trace_id: trace_id.map(|t| t.to_string()),
                peer_address: e.peer,
                error: e.error.map(Cow::into_owned),
            });
        }
    }
}
