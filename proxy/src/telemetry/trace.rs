//! Spans: one per HTTP request and side (client on the outbound proxy, server on the inbound),
//! recorded as weft's own [`SpanRecord`]s (why: see [`super::span`]) and exported to the
//! mesh's tracing backend.
//!
//! [`Tracing`] is built from one `TracingBackend` of a snapshot: a trace-id-ratio
//! [`Sampler`] over the backend's percentage, a bounded queue, and an exporter task:
//! OTLP/gRPC (`opentelemetry`, see [`super::otlp`]) or Zipkin v2 JSON (`zipkin`, see
//! [`super::zipkin`]), both with `service.name` = the proxy's service.
//!
//! Sampling: the decision is a function of the trace id (the rule of OpenTelemetry's
//! `TraceIdRatioBased`), for new and continued traces alike. So `0` exports nothing and `100`
//! everything, whatever the caller's headers say, and every weft proxy of the mesh (same
//! percentage) makes the same decision for one trace: a sampled trace has all its mesh spans.
//! The decision travels on in the `traceparent`/B3 sampled flag, for the application's own
//! tracing to follow. (Envoy instead follows an incoming sampled flag; a caller's flag does
//! not force weft's hand.) An unsampled request costs two random ids and the header rewrite;
//! nothing is recorded.
//!
//! Exporting never slows or fails traffic: a finished span goes into a bounded queue without
//! waiting (see [`SpanSink`]), and a span that does not fit is dropped and counted
//! (`weft_trace_spans_dropped_total{reason="queue_full"}`). The exporter task sends batches of
//! up to `batch` spans at least every `export_interval`, each bounded by `export_timeout`; a
//! failed batch is dropped and counted (`reason="export_failed"`), never retried past that;
//! a span that ends after its exporter task stopped counts as `reason="closed"`.
//! When a new snapshot changes the backend, a new [`Tracing`] replaces this one; spans still
//! open finish on the old one (each holds its [`SpanSink`]), whose task flushes and exits once
//! the last of them is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use http::HeaderMap;
use opentelemetry::trace::{SpanId, TraceId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use weft_api::mesh::TracingBackendType;
use weft_api::proto::TracingBackend;

use super::otlp::OtlpExporter;
use super::propagation::{self, B3Mode, SpanIds};
use super::span::{Sampler, SpanRecord, new_span_id, new_trace_id};
use super::zipkin::ZipkinExporter;
use super::{TelemetryError, TelemetryOptions};

/// `reason` label of dropped spans and access-log lines.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `queue_full`, `export_failed`/`write_failed`, or `closed`.
    pub reason: &'static str,
}

/// Counters of the span pipeline. Clones share the series.
#[derive(Clone, Debug)]
pub struct TraceMetrics {
    /// `weft_trace_spans_exported_total`.
    pub exported: Counter,
    /// `weft_trace_spans_dropped_total{reason}`.
    pub dropped: Family<ReasonLabel, Counter>,
    queue_full: Counter,
    export_failed: Counter,
    closed: Counter,
}

impl Default for TraceMetrics {
    fn default() -> Self {
        let dropped = Family::<ReasonLabel, Counter>::default();
        let get = |reason| dropped.get_or_create(&ReasonLabel { reason }).clone();
        let (queue_full, export_failed, closed) =
            (get("queue_full"), get("export_failed"), get("closed"));
        Self {
            exported: Counter::default(),
            dropped,
            queue_full,
            export_failed,
            closed,
        }
    }
}

impl TraceMetrics {
    /// Registers the counters (full names).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_trace_spans_exported",
            "Spans delivered to the mesh's tracing backend",
            self.exported.clone(),
        );
        registry.register(
            "weft_trace_spans_dropped",
            "Spans not delivered: the export queue was full, or the backend failed",
            self.dropped.clone(),
        );
    }

    /// Spans dropped because the queue was full.
    pub fn dropped_queue_full(&self) -> u64 {
        self.queue_full.get()
    }

    /// Spans dropped because their batch failed to export.
    pub fn dropped_export_failed(&self) -> u64 {
        self.export_failed.get()
    }
}

/// The tracing of one backend configuration.
#[derive(Debug)]
pub struct Tracing {
    sink: SpanSink,
    sampler: Sampler,
    b3: bool,
    settings: TracingBackend,
}

/// The `TracingBackend` fields that matter (a new `Tracing` is built when they change).
pub fn same_backend(a: &TracingBackend, b: &TracingBackend) -> bool {
    a.enabled == b.enabled
        && a.backend_type == b.backend_type
        && a.endpoint == b.endpoint
        && a.sampling.to_bits() == b.sampling.to_bits()
}

/// Where a span goes when it ends: the bounded queue of one [`Tracing`]'s exporter task.
/// Clones share the queue; the task flushes and exits once the last clone is gone.
#[derive(Debug, Clone)]
pub struct SpanSink(Arc<Queue>);

/// Finished spans waiting for the exporter task.
///
/// A vector behind a lock rather than a channel: a span is pushed into spare capacity under
/// a lock that nobody else holds but for the few instructions of a push or a swap, and the
/// exporter takes everything waiting by swapping in its own emptied vector, so neither side
/// allocates in the steady state. (tokio's bounded channel costs a semaphore permit, a slot
/// in a linked block and a waker check per span, and a new block every 32 spans.)
///
/// The spans are boxed: each was allocated when its request began, and queueing the pointer
/// spares a copy of the whole record under the lock.
#[derive(Debug)]
struct Queue {
    #[expect(
        clippy::vec_box,
        reason = "the records are queued where they were made"
    )]
    spans: Mutex<Vec<Box<SpanRecord>>>,
    /// Most spans waiting; more are dropped.
    capacity: usize,
    /// Wakes the exporter task when a full batch is waiting.
    batch_ready: Notify,
    /// Spans per export.
    batch: usize,
    /// The exporter task has stopped.
    closed: AtomicBool,
    metrics: TraceMetrics,
}

impl Queue {
    #[expect(clippy::vec_box, reason = "see `Queue`")]
    fn lock(&self) -> MutexGuard<'_, Vec<Box<SpanRecord>>> {
        // A panic while holding the lock leaves a valid vector: keep using it.
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SpanSink {
    /// Queues a finished span without waiting; counts it as dropped when it does not fit.
    pub fn send(&self, span: Box<SpanRecord>) {
        let q = &self.0;
        if q.closed.load(Ordering::Acquire) {
            // The task is gone (the runtime is shutting down).
            q.metrics.closed.inc();
            return;
        }
        let waiting = {
            let mut spans = q.lock();
            if spans.len() >= q.capacity {
                None
            } else {
                spans.push(span);
                Some(spans.len())
            }
        };
        match waiting {
            None => {
                q.metrics.queue_full.inc();
            }
            // The exporter sleeps until a batch is full (or its interval ends) rather than
            // waking for every span.
            Some(n) if n == q.batch => q.batch_ready.notify_one(),
            Some(_) => {}
        }
    }
}

/// The ids of a request's span, decided by [`Tracing::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The trace: the caller's, or a new one.
    pub trace_id: TraceId,
    /// The proxy's span for this request.
    pub span_id: SpanId,
    /// The caller's span, when the trace continues one.
    pub parent_id: Option<SpanId>,
    /// Whether to record and export the span.
    pub sampled: bool,
}

/// The two exporters, behind one `export` (boxed: made once per backend, and of unequal size).
enum Exporter {
    Otlp(Box<OtlpExporter>),
    Zipkin(Box<ZipkinExporter>),
}

impl Exporter {
    async fn export(&mut self, batch: &[Box<SpanRecord>]) -> Result<(), String> {
        match self {
            Exporter::Otlp(e) => e.export(batch).await,
            Exporter::Zipkin(e) => e.export(batch).await,
        }
    }
}

impl Tracing {
    /// Builds the sampler and starts the exporter task; needs a tokio runtime.
    pub fn new(
        backend: &TracingBackend,
        service: &str,
        mesh: &str,
        options: &TelemetryOptions,
        metrics: &TraceMetrics,
    ) -> Result<Self, TelemetryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let (exporter, b3) = match TracingBackendType::from_name(&backend.backend_type) {
            Some(TracingBackendType::Opentelemetry) => {
                // The tonic channel must be built inside the runtime.
                let _enter = runtime.enter();
                let e =
                    OtlpExporter::new(&backend.endpoint, service, mesh, options.export_timeout)?;
                (Exporter::Otlp(Box::new(e)), false)
            }
            Some(TracingBackendType::Zipkin) => (
                Exporter::Zipkin(Box::new(ZipkinExporter::new(
                    &backend.endpoint,
                    service,
                    mesh,
                )?)),
                true,
            ),
            None => {
                return Err(TelemetryError::Backend {
                    backend: "tracing",
                    reason: format!("unknown backend type {:?}", backend.backend_type),
                });
            }
        };
        let capacity = options.trace_queue.max(1);
        let queue = Arc::new(Queue {
            spans: Mutex::new(Vec::new()),
            capacity,
            batch_ready: Notify::new(),
            batch: options.trace_batch.clamp(1, capacity),
            closed: AtomicBool::new(false),
            metrics: metrics.clone(),
        });
        let task_queue = TaskQueue(Arc::clone(&queue));
        runtime.spawn(export_loop(exporter, task_queue, options.clone()));
        Ok(Self {
            sink: SpanSink(queue),
            sampler: Sampler::percent(backend.sampling),
            b3,
            settings: backend.clone(),
        })
    }

    /// The settings this was built from.
    pub fn settings(&self) -> &TracingBackend {
        &self.settings
    }

    /// Whether B3 headers are read and written (zipkin backends).
    pub fn b3(&self) -> bool {
        self.b3
    }

    /// Where this backend's spans go.
    pub fn sink(&self) -> &SpanSink {
        &self.sink
    }

    /// Decides a request's span: a child of the context in `headers` (or a new root), sampled
    /// or not by trace id. Rewrites `headers` so the forwarded request carries the new span as
    /// its parent: for a request `to_app`, in every format of the backend; for one going to
    /// the peer proxy, as `traceparent` only (see [`B3Mode::Remove`]).
    pub fn start(&self, headers: &mut HeaderMap, to_app: bool) -> Started {
        let extracted = propagation::extract(headers, self.b3);
        let trace_id = extracted.as_ref().map_or_else(new_trace_id, |e| e.trace_id);
        let span_id = new_span_id();
        let parent_id = extracted.as_ref().map(|e| e.span_id);
        let sampled = self.sampler.sampled(trace_id);
        propagation::inject(
            headers,
            SpanIds {
                trace_id,
                span_id,
                sampled,
            },
            parent_id,
            extracted.is_some(),
            match (self.b3, to_app) {
                (false, _) => B3Mode::Leave,
                (true, true) => B3Mode::Write,
                (true, false) => B3Mode::Remove,
            },
        );
        Started {
            trace_id,
            span_id,
            parent_id,
            sampled,
        }
    }
}

/// The exporter task's own handle on its queue. It marks the queue closed when the task ends,
/// and also when the task is dropped unpolled with its runtime, so that later spans are
/// counted as `closed` rather than left waiting.
struct TaskQueue(Arc<Queue>);

impl Drop for TaskQueue {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

/// Sends the waiting spans, in batches of at most `trace_batch`, whenever a batch is full or
/// `export_interval` has passed with spans waiting, until the queue's senders are all gone;
/// then flushes what is left and exits.
async fn export_loop(mut exporter: Exporter, task_queue: TaskQueue, options: TelemetryOptions) {
    let queue = &task_queue.0;
    let max = options.trace_batch.max(1);
    let metrics = &queue.metrics;
    let mut batch = Vec::new();
    loop {
        let waiting = queue.lock().len();
        // Only this task's own reference is left: no span can arrive any more.
        let senders_gone = Arc::strong_count(queue) == 1;
        if waiting == 0 && senders_gone {
            return;
        }
        if waiting < queue.batch && !senders_gone {
            // Sleeps through a whole interval: no wake-up per span (the senders notify only
            // when a batch is full). Senders that are gone are seen at the next tick.
            tokio::select! {
                () = queue.batch_ready.notified() => {}
                () = tokio::time::sleep(options.export_interval) => {}
            }
            if queue.lock().is_empty() {
                continue;
            }
        }
        std::mem::swap(&mut *queue.lock(), &mut batch);
        for chunk in batch.chunks(max) {
            SpanRecord::warm_up(chunk);
            let n = chunk.len() as u64;
            match tokio::time::timeout(options.export_timeout, exporter.export(chunk)).await {
                Ok(Ok(())) => {
                    metrics.exported.inc_by(n);
                }
                Ok(Err(e)) => {
                    metrics.export_failed.inc_by(n);
                    tracing::debug!(error = %e, spans = n, "span export failed; batch dropped");
                }
                Err(_) => {
                    metrics.export_failed.inc_by(n);
                    tracing::debug!(spans = n, "span export timed out; batch dropped");
                }
            }
        }
        SpanRecord::recycle(batch.drain(..));
        // After a backlog (a slow backend), give back what a normal batch does not need.
        if batch.capacity() > 2 * max {
            batch.shrink_to(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::span::{InlineStr, SpanKind};
    use std::time::{Duration, SystemTime};

    fn backend(kind: &str, endpoint: &str, sampling: f64) -> TracingBackend {
        TracingBackend {
            enabled: true,
            name: "t".into(),
            backend_type: kind.into(),
            endpoint: endpoint.into(),
            sampling,
        }
    }

    fn record(s: Started) -> SpanRecord {
        SpanRecord {
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent_id: s.parent_id,
            kind: SpanKind::Client,
            method: "GET",
            method_original: None,
            path: InlineStr::new("/"),
            https: false,
            server: None,
            service: Arc::from("backend"),
            peer_service: None,
            start: SystemTime::now(),
            duration: Duration::from_millis(1),
            status: Some(200),
            peer: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn sampling_0_and_100_decide_new_roots() {
        let metrics = TraceMetrics::default();
        let options = TelemetryOptions::default();
        // Nothing listens there: spans would only fail to export, later.
        let url = "http://127.0.0.1:9/api/v2/spans";
        let all = Tracing::new(
            &backend("zipkin", url, 100.0),
            "web",
            "m",
            &options,
            &metrics,
        )
        .expect("tracing");
        let none = Tracing::new(&backend("zipkin", url, 0.0), "web", "m", &options, &metrics)
            .expect("tracing");
        for _ in 0..50 {
            let mut h = HeaderMap::new();
            let s = all.start(&mut h, true);
            assert!(s.sampled && s.parent_id.is_none());
            let mut h = HeaderMap::new();
            assert!(!none.start(&mut h, true).sampled);
            // Still propagated, flagged not sampled, so the next hop agrees.
            let tp = h.get("traceparent").expect("injected");
            assert!(tp.as_bytes().ends_with(b"-00"));
        }
        // The caller's flag does not override the percentage either way; the trace continues.
        for (tracing, flag, sampled) in [(&none, "01", false), (&all, "00", true)] {
            let mut h = HeaderMap::new();
            let tp = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flag}");
            h.insert(
                "traceparent",
                http::HeaderValue::from_str(&tp).expect("header"),
            );
            let s = tracing.start(&mut h, true);
            assert_eq!(s.sampled, sampled);
            assert_eq!(s.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(
                s.parent_id.map(|p| p.to_string()).as_deref(),
                Some("00f067aa0ba902b7")
            );
            let forwarded = h.get("traceparent").and_then(|v| v.to_str().ok());
            let expected = format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-0{}",
                s.span_id,
                u8::from(sampled)
            );
            assert_eq!(forwarded, Some(expected.as_str()));
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let metrics = TraceMetrics::default();
        let options = TelemetryOptions {
            trace_queue: 4,
            trace_batch: 4,
            // The exporter task waits this long for a batch to fill: the queue backs up.
            export_interval: Duration::from_secs(60),
            ..TelemetryOptions::default()
        };
        let t = Tracing::new(
            &backend("zipkin", "http://127.0.0.1:9/", 100.0),
            "web",
            "m",
            &options,
            &metrics,
        )
        .expect("tracing");
        for _ in 0..20 {
            let mut h = HeaderMap::new();
            let s = t.start(&mut h, true);
            t.sink().send(Box::new(record(s)));
        }
        // The task may have taken up to one batch out of the queue: 4 queued + 4 in hand.
        let dropped = metrics.dropped_queue_full();
        assert!((12..=16).contains(&dropped), "dropped {dropped}");
    }

    #[tokio::test]
    async fn an_unreachable_collector_drops_and_counts_the_batches() {
        // Port 9 on loopback refuses connections: every export fails at once.
        for (kind, endpoint) in [
            ("zipkin", "http://127.0.0.1:9/api/v2/spans"),
            ("opentelemetry", "127.0.0.1:9"),
        ] {
            let metrics = TraceMetrics::default();
            let options = TelemetryOptions {
                trace_batch: 4,
                export_interval: Duration::from_millis(10),
                ..TelemetryOptions::default()
            };
            let t = Tracing::new(
                &backend(kind, endpoint, 100.0),
                "web",
                "m",
                &options,
                &metrics,
            )
            .expect("tracing");
            for _ in 0..10 {
                let s = t.start(&mut HeaderMap::new(), true);
                t.sink().send(Box::new(record(s)));
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while metrics.dropped_export_failed() < 10 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(metrics.dropped_export_failed(), 10, "{kind}");
            assert_eq!(metrics.exported.get(), 0, "{kind}");
            assert_eq!(metrics.dropped_queue_full(), 0, "{kind}");
        }
    }

    #[test]
    fn spans_after_the_exporter_task_is_gone_count_as_closed() {
        let metrics = TraceMetrics::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let t = {
            let _enter = runtime.enter();
            Tracing::new(
                &backend("zipkin", "http://127.0.0.1:9/", 100.0),
                "web",
                "m",
                &TelemetryOptions::default(),
                &metrics,
            )
            .expect("tracing")
        };
        // The exporter task never ran: the runtime drops it unpolled.
        drop(runtime);
        let s = t.start(&mut HeaderMap::new(), true);
        t.sink().send(Box::new(record(s)));
        assert_eq!(metrics.closed.get(), 1);
        assert_eq!(metrics.dropped_queue_full(), 0);
    }

    #[test]
    fn unknown_backends_and_missing_runtime_are_errors() {
        let metrics = TraceMetrics::default();
        let options = TelemetryOptions::default();
        let b = backend("zipkin", "http://127.0.0.1:9/", 100.0);
        assert!(matches!(
            Tracing::new(&b, "web", "m", &options, &metrics),
            Err(TelemetryError::NoRuntime)
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let b = backend("datadog", "x", 100.0);
            assert!(Tracing::new(&b, "web", "m", &options, &metrics).is_err());
            let b = backend("opentelemetry", "https://collector:4317", 100.0);
            assert!(Tracing::new(&b, "web", "m", &options, &metrics).is_err());
        });
    }
}
