//! Spans: one per HTTP request and side (client on the outbound proxy, server on the inbound),
//! made with the OpenTelemetry SDK and exported to the mesh's tracing backend.
//!
//! [`Tracing`] is built from one `TracingBackend` of a snapshot: a tracer provider whose
//! resource has `service.name` = the proxy's service, a trace-id-ratio sampler over the
//! backend's percentage, and a [`QueueProcessor`] feeding an exporter task:
//! OTLP/gRPC (`opentelemetry`) or Zipkin v2 JSON (`zipkin`, see [`super::zipkin`]).
//!
//! Sampling: the decision is a function of the trace id (the SDK's `TraceIdRatioBased`), for
//! new and continued traces alike. So `0` exports nothing and `100` everything, whatever the
//! caller's headers say, and every weft proxy of the mesh (same percentage) makes the same
//! decision for one trace: a sampled trace has all its mesh spans. The decision travels on in
//! the `traceparent`/B3 sampled flag, for the application's own tracing to follow. (Envoy
//! instead follows an incoming sampled flag; a caller's flag does not force weft's hand.)
//!
//! Exporting never slows or fails traffic: a finished span goes into a bounded queue with
//! `try_send`, and a span that does not fit is dropped and counted
//! (`weft_trace_spans_dropped_total{reason="queue_full"}`). The exporter task sends batches of
//! up to `batch` spans at least every `export_interval`, each bounded by `export_timeout`; a
//! failed batch is dropped and counted (`reason="export_failed"`), never retried past that;
//! a span that ends after its exporter task stopped counts as `reason="closed"`.
//! When a new snapshot changes the backend, a new [`Tracing`] replaces this one; spans still
//! open finish on the old one, whose task flushes and exits once the last of them is gone.

use std::borrow::Cow;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use weft_api::proto::TracingBackend;

use super::propagation::{self, Extracted};
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
    tracer: SdkTracer,
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

/// An OTLP endpoint as tonic wants it: Kuma's examples give `host:port` without a scheme.
fn otlp_endpoint(endpoint: &str) -> Result<String, TelemetryError> {
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

impl Tracing {
    /// Builds the tracer and starts its exporter task; needs a tokio runtime.
    pub fn new(
        backend: &TracingBackend,
        service: &str,
        mesh: &str,
        options: &TelemetryOptions,
        metrics: &TraceMetrics,
    ) -> Result<Self, TelemetryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let resource = Resource::builder_empty()
            .with_service_name(service.to_string())
            .with_attribute(KeyValue::new("weft.mesh", mesh.to_string()))
            .build();
        let (tx, rx) = mpsc::channel(options.trace_queue.max(1));
        let b3 = match backend.backend_type.as_str() {
            "opentelemetry" => {
                let endpoint = otlp_endpoint(&backend.endpoint)?;
                // The tonic exporter must be built inside the runtime.
                let _enter = runtime.enter();
                use opentelemetry_otlp::WithExportConfig as _;
                let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .with_timeout(options.export_timeout)
                    .build()
                    .map_err(|e| TelemetryError::Backend {
                        backend: "opentelemetry",
                        reason: e.to_string(),
                    })?;
                exporter.set_resource(&resource);
                runtime.spawn(export_loop(exporter, rx, options.clone(), metrics.clone()));
                false
            }
            "zipkin" => {
                let exporter = ZipkinExporter::new(&backend.endpoint, service)?;
                runtime.spawn(export_loop(exporter, rx, options.clone(), metrics.clone()));
                true
            }
            other => {
                return Err(TelemetryError::Backend {
                    backend: "tracing",
                    reason: format!("unknown backend type {other:?}"),
                });
            }
        };
        let ratio = if backend.sampling.is_finite() {
            (backend.sampling / 100.0).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor {
                tx,
                metrics: metrics.clone(),
            })
            .with_sampler(Sampler::TraceIdRatioBased(ratio))
            .with_resource(resource)
            .build();
        Ok(Self {
            tracer: provider.tracer("weft-proxy"),
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

    /// Starts a span of `kind` as the child of the context in `headers` (or a new root), and
    /// rewrites `headers` so the forwarded request carries the new span as its parent.
    pub fn start(
        &self,
        kind: SpanKind,
        name: Cow<'static, str>,
        attributes: Vec<KeyValue>,
        headers: &mut HeaderMap,
    ) -> Span {
        let extracted: Option<Extracted> = propagation::extract(headers, self.b3);
        let parent_cx = match &extracted {
            Some(e) => Context::new().with_remote_span_context(e.span_context()),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(name)
            .with_kind(kind)
            .with_attributes(attributes);
        let span = self.tracer.build_with_context(builder, &parent_cx);
        use opentelemetry::trace::Span as _;
        let sc: &SpanContext = span.span_context();
        propagation::inject(
            headers,
            sc,
            extracted.as_ref().map(|e| e.span_id),
            extracted.is_some(),
            self.b3,
        );
        span
    }
}

/// Hands finished spans to the exporter task without blocking; counts what does not fit.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    metrics: TraceMetrics,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let counter = match self.tx.try_send(span) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => &self.metrics.queue_full,
            // The task is gone (the runtime is shutting down).
            Err(mpsc::error::TrySendError::Closed(_)) => &self.metrics.closed,
        };
        counter.inc();
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    /// Non-blocking: the exporter task flushes what is queued and exits once this processor
    /// (its sender) is dropped.
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Sends batches until the queue's sender is gone, then flushes and shuts the exporter down.
async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<SpanData>,
    options: TelemetryOptions,
    metrics: TraceMetrics,
) {
    let max = options.trace_batch.max(1);
    let mut open = true;
    while open {
        let mut batch = Vec::with_capacity(max);
        if rx.recv_many(&mut batch, max).await == 0 {
            break;
        }
        let deadline = tokio::time::sleep(options.export_interval);
        tokio::pin!(deadline);
        while batch.len() < max {
            let room = max - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => {
                    if n == 0 {
                        open = false;
                        break;
                    }
                }
                _ = &mut deadline => break,
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(options.export_timeout, exporter.export(batch)).await {
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
    let _ = exporter.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::Span as _;

    fn backend(kind: &str, endpoint: &str, sampling: f64) -> TracingBackend {
        TracingBackend {
            enabled: true,
            name: "t".into(),
            backend_type: kind.into(),
            endpoint: endpoint.into(),
            sampling,
        }
    }

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            otlp_endpoint("collector:4317").ok().as_deref(),
            Some("http://collector:4317")
        );
        assert!(otlp_endpoint("").is_err());
        assert!(otlp_endpoint("https://collector:4317").is_err());
        assert!(otlp_endpoint("http://").is_err());
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
            let s = all.start(SpanKind::Client, "GET".into(), vec![], &mut h);
            assert!(s.span_context().is_sampled() && s.is_recording());
            let mut h = HeaderMap::new();
            let s = none.start(SpanKind::Client, "GET".into(), vec![], &mut h);
            assert!(!s.span_context().is_sampled() && !s.is_recording());
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
            let s = tracing.start(SpanKind::Server, "GET".into(), vec![], &mut h);
            assert_eq!(s.span_context().is_sampled(), sampled);
            assert_eq!(
                s.span_context().trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
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
            let mut s = t.start(SpanKind::Client, "GET".into(), vec![], &mut h);
            s.end();
        }
        // The task may have taken up to one batch out of the queue: 4 queued + 4 in hand.
        let dropped = metrics.dropped_queue_full();
        assert!((12..=16).contains(&dropped), "dropped {dropped}");
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
        });
    }
}
