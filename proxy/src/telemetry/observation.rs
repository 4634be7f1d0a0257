//! One observed HTTP exchange: [`RequestObservation`], from `Telemetry::begin` to
//! [`RequestObservation::finish`] (or drop).
//!
//! With tracing and access logs off an observation is the service's metric handles, a start
//! instant and the status: creating and finishing it allocates nothing. A sampled span is a
//! boxed [`SpanRecord`] that goes into the exporter's queue as it is: ending it fills in the
//! outcome in place and queues the pointer, so the record is never copied (a copy of its
//! 336 bytes, made under the queue's lock, was most of what ending a span cost). The access-log
//! fields live in a box of their own that exists only when logs are on.

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
    span: Option<(Box<SpanRecord>, SpanSink)>,
    log: Option<Box<LogDetail>>,
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
            span: None,
            log: None,
        }
    }

    /// When the exchange began (the instant `begin` was called).
    pub fn started(&self) -> Instant {
        self.start
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

    /// The trace this exchange belongs to: its span's when it is sampled; else, with access
    /// logs on, the one its log line carries (the propagated trace with tracing on, the
    /// caller's with tracing off); else `None`.
    pub fn trace_id(&self) -> Option<TraceId> {
        match (&self.span, &self.log) {
            (Some((span, _)), _) => Some(span.trace_id),
            (None, Some(log)) => log.trace_id,
            (None, None) => None,
        }
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
        let end = End {
            status: self.status,
            elapsed,
            sent,
            received,
            error,
            aborted,
            peer: self.peer,
        };
        if let Some((span, sink)) = self.span.take() {
            end_span(span, &sink, &end);
        }
        if let Some(log) = self.log.take() {
            log.write(end);
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

/// The access-log part of an observation.
struct LogDetail {
    log: AccessLog,
    direction: Direction,
    start_time: SystemTime,
    /// The span's trace, or with tracing off the caller's (if it sent one).
    trace_id: Option<TraceId>,
    mesh: Arc<str>,
    source: Option<Arc<str>>,
    destination: Option<Arc<str>>,
    method: String,
    path: String,
}

/// The most bytes of a path (or a custom method) a span or a log line keeps: the queues are
/// bounded in entries, and a caller may send paths of up to the 64 KiB head limit.
const MAX_RECORDED: usize = 1024;

/// `text` cut to at most [`MAX_RECORDED`] bytes, at a character boundary.
fn bounded(text: &str) -> &str {
    if text.len() <= MAX_RECORDED {
        return text;
    }
    let mut end = MAX_RECORDED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
        method_original: (method == "_OTHER").then(|| bounded(b.method.as_str()).into()),
        path: InlineStr::new(bounded(b.uri.path())),
        https: b.uri.scheme_str() == Some("https"),
        server: server(b.uri, b.headers),
        service: Arc::clone(service),
        peer_service: b.peer_service.cloned(),
        start,
        duration: std::time::Duration::ZERO,
        status: None,
        peer: None,
        error: None,
    }
}

/// Starts the span (if tracing) and captures the log fields (if logging).
pub(super) fn begin(
    handles: Arc<ServiceHandles>,
    start: Instant,
    b: Begin<'_>,
) -> RequestObservation {
    // The wall clock is read only for a span or a log line: not for an unsampled request.
    let mut start_time = None;
    let mut now = || *start_time.get_or_insert_with(SystemTime::now);
    let mut obs = RequestObservation::metrics_only(handles, start);
    let trace_id = match b.tracing {
        Some(t) => {
            let started = t.start(b.headers, b.direction == Direction::Inbound);
            if started.sampled {
                let r = record(&b, obs.handles.service(), started, now());
                obs.span = Some((SpanRecord::boxed(r), t.sink().clone()));
            }
            Some(started.trace_id)
        }
        None => propagation::extract(b.headers, true).map(|e| e.trace_id),
    };
    if let Some(log) = b.log {
        let (source, destination) = endpoints(
            b.direction,
            b.local_service,
            b.service,
            b.peer_service.cloned(),
        );
        obs.log = Some(Box::new(LogDetail {
            log: log.clone(),
            direction: b.direction,
            start_time: now(),
            trace_id,
            mesh: Arc::clone(b.mesh),
            source,
            destination,
            method: bounded(b.method.as_str()).to_string(),
            path: bounded(b.uri.path()).to_string(),
        }));
    }
    obs
}

/// Fills in how the exchange went and queues the span for export.
fn end_span(mut span: Box<SpanRecord>, sink: &SpanSink, e: &End<'_>) {
    span.duration = e.elapsed;
    span.status = e.status;
    span.peer = e.peer;
    // Semconv: 5xx is an error on both sides, 4xx on the client side only.
    let client = span.kind == SpanKind::Client;
    let error_status = e
        .status
        .filter(|c| *c >= 500 || (client && *c >= 400) || *c < 100);
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

impl LogDetail {
    fn write(self: Box<Self>, e: End<'_>) {
        let d = *self;
        d.log.send(AccessLogEntry {
            start_time: d.start_time,
            duration_ms: e.elapsed,
            direction: d.direction.as_str(),
            protocol: "http",
            mesh: d.mesh,
            source_service: d.source,
            destination_service: d.destination,
            method: Some(d.method),
            path: Some(d.path),
            status: e.status,
            bytes_sent: e.sent,
            bytes_received: e.received,
            trace_id: d.trace_id.map(|t| t.to_string()),
            peer_address: e.peer,
            error: e.error.map(Cow::into_owned),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("/short"), "/short");
        let long = format!("/{}", "é".repeat(2000));
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_RECORDED && cut.len() >= MAX_RECORDED - 1);
        assert!(long.starts_with(cut));
    }
}
