//! Request metrics: `weft_requests_total{direction,service,code}` and
//! `weft_request_duration_seconds{direction,service}`, updated without a lock or an
//! allocation on the request path.
//!
//! prometheus-client's `Family::get_or_create` takes a lock and clones the label set, and its
//! `Histogram` sits behind a mutex. So the series are resolved once and kept: [`ServiceHandles`]
//! holds, for one `(direction, service)`, a slot for the duration histogram (an atomic
//! [`DurationHistogram`] of our own) and a table of slots for request counters by status code,
//! each filled on first use ([`OnceLock`]; a service without traffic adds nothing to a
//! scrape). The handles of every service of the current snapshot sit in a [`HandleTable`] that
//! the proxy swaps whole (`arc-swap`) when the service set changes, reusing the handles of
//! services that stay. After the first request of a `(direction, service, code)`, recording
//! one is a map lookup and a few atomic adds.
//!
//! Labels stay bounded: `service` is a service of the snapshot or `unknown`, `code` is the
//! HTTP status (`100`–`999`) or `0` when no response status was sent (transport failure,
//! aborted exchange, or an out-of-range code). When a service leaves the snapshot, its
//! handles are retired and its series deleted, so a long-lived proxy in a changing mesh does
//! not export (or keep in memory) the series of every service it ever saw.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::Direction;

/// The `service` label of a service the snapshot does not name.
pub const UNKNOWN_SERVICE: &str = "unknown";

/// Upper bounds of `weft_request_duration_seconds`, from 100 µs to 60 s (`+Inf` is added).
pub const DURATION_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// `{direction, service, code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// A service of the snapshot, or `unknown`.
    pub service: String,
    /// The response status, or `0` when none was sent.
    pub code: String,
}

/// `{direction, service}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// A service of the snapshot, or `unknown`.
    pub service: String,
}

/// A histogram of durations whose buckets, sum and count are plain atomics: observing takes
/// no lock. The sum is kept in nanoseconds and shown in seconds. Clones share the series.
#[derive(Clone, Debug, Default)]
pub struct DurationHistogram {
    inner: Arc<HistogramCells>,
}

#[derive(Debug)]
struct HistogramCells {
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for HistogramCells {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl DurationHistogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let cells = &*self.inner;
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS.partition_point(|&le| le < secs);
        cells.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        cells.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        cells.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); DURATION_BUCKETS.len() + 1];
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::INFINITY]);
        for ((slot, le), n) in buckets.iter_mut().zip(bounds).zip(&self.inner.buckets) {
            *slot = (le, n.load(Ordering::Relaxed));
        }
        // The count shown is the buckets' total, so a scrape racing an observation stays
        // self-consistent.
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Builds a [`DurationHistogram`] for a [`Family`].
pub type HistogramConstructor = fn() -> DurationHistogram;

/// Requests and failed requests of every service and direction, for the discovery stats
/// report.
#[derive(Debug, Default)]
pub struct Totals {
    requests: AtomicU64,
    errors: AtomicU64,
}

impl Totals {
    /// `(requests, errors)` so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// The registered families behind the handles.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    /// `weft_requests_total{direction,service,code}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `weft_request_duration_seconds{direction,service}`.
    pub duration: Family<ServiceLabels, DurationHistogram, HistogramConstructor>,
    /// Totals over all series.
    pub totals: Arc<Totals>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(DurationHistogram::default),
            totals: Arc::default(),
        }
    }
}

impl RequestMetrics {
    /// Registers both families (full names; use a registry without a prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_requests",
            "HTTP requests handled by the proxy, by direction, service and response status (0: none)",
            self.requests.clone(),
        );
        registry.register(
            "weft_request_duration_seconds",
            "Time from the start of an HTTP request to the end of its response, by direction and service",
            self.duration.clone(),
        );
    }

    fn handles(&self, direction: Direction, service: &str) -> ServiceHandles {
        ServiceHandles {
            direction,
            service: Arc::from(service),
            duration: OnceLock::new(),
            durations: self.duration.clone(),
            requests: self.requests.clone(),
            totals: Arc::clone(&self.totals),
            codes: Default::default(),
            retired: AtomicBool::new(false),
        }
    }
}

/// Status codes are grouped by hundred; each group's 100 slots are allocated on first use.
type CodeSlots = Box<[OnceLock<Counter>; 100]>;

/// The pre-resolved series of one `(direction, service)`. Series are created on the first
/// request that needs them, so a service without traffic adds nothing to a scrape.
pub struct ServiceHandles {
    direction: Direction,
    service: Arc<str>,
    duration: OnceLock<DurationHistogram>,
    durations: Family<ServiceLabels, DurationHistogram, HistogramConstructor>,
    requests: Family<RequestLabels, Counter>,
    totals: Arc<Totals>,
    /// Index `code / 100`; group 0 holds only code 0 ("no status").
    codes: [OnceLock<CodeSlots>; 10],
    /// The service left the snapshot: its series are deleted and must not come back.
    retired: AtomicBool,
}

impl std::fmt::Debug for ServiceHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandles")
            .field("direction", &self.direction)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl ServiceHandles {
    /// The `service` label (a snapshot service or `unknown`).
    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    /// The counter of `code`; resolved through the family (lock + allocation) only the first
    /// time this code is seen for this service.
    pub fn counter(&self, code: u16) -> &Counter {
        let code = if (100..=999).contains(&code) { code } else { 0 };
        let group = self.codes[usize::from(code / 100)]
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        group[usize::from(code % 100)].get_or_init(|| {
            let labels = self.request_labels(code);
            let counter = self.requests.get_or_create(&labels).clone();
            // A request that outlived its service's retirement counts on a detached counter.
            // Checked after creating: either `retire` sees the series in its sweep, or this
            // sees the flag.
            if self.retired.load(Ordering::SeqCst) {
                self.requests.remove(&labels);
            }
            counter
        })
    }

    fn request_labels(&self, code: u16) -> RequestLabels {
        RequestLabels {
            direction: self.direction.as_str(),
            service: self.service.to_string(),
            code: code.to_string(),
        }
    }

    fn service_labels(&self) -> ServiceLabels {
        ServiceLabels {
            direction: self.direction.as_str(),
            service: self.service.to_string(),
        }
    }

    /// The service left the snapshot: deletes its series from the families (every code it
    /// may have used), and keeps any request still in flight from creating them again.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.durations.remove(&self.service_labels());
        for code in std::iter::once(0).chain(100..=999) {
            self.requests.remove(&self.request_labels(code));
        }
    }

    /// The duration histogram; resolved through the family only on first use.
    pub fn histogram(&self) -> &DurationHistogram {
        self.duration.get_or_init(|| {
            // The family keeps its member; the handle shares it.
            let labels = self.service_labels();
            let histogram = self.durations.get_or_create(&labels).clone();
            if self.retired.load(Ordering::SeqCst) {
                self.durations.remove(&labels);
            }
            histogram
        })
    }

    /// Records one finished request; `failed` counts it in the error total too.
    pub fn record(&self, code: u16, elapsed: Duration, failed: bool) {
        self.counter(code).inc();
        self.histogram().observe(elapsed);
        self.totals.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.totals.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The handles of every known service, per direction. Built off the request path.
#[derive(Debug)]
pub struct HandleTable {
    outbound: HashMap<Arc<str>, Arc<ServiceHandles>>,
    inbound: HashMap<Arc<str>, Arc<ServiceHandles>>,
    /// Indexed by `Direction as usize`.
    unknown: [Arc<ServiceHandles>; 2],
}

impl HandleTable {
    /// A table for `services`, reusing `previous`'s handles for services it already had.
    pub fn build<'a>(
        metrics: &RequestMetrics,
        services: impl IntoIterator<Item = &'a str> + Clone,
        previous: Option<&HandleTable>,
    ) -> Self {
        let build = |direction: Direction| {
            let old = previous.map(|p| p.map(direction));
            let mut map = HashMap::new();
            for service in services.clone() {
                let handles = old
                    .and_then(|m| m.get(service).cloned())
                    .unwrap_or_else(|| Arc::new(metrics.handles(direction, service)));
                map.insert(Arc::clone(&handles.service), handles);
            }
            let unknown = previous
                .map(|p| Arc::clone(&p.unknown[direction as usize]))
                .unwrap_or_else(|| Arc::new(metrics.handles(direction, UNKNOWN_SERVICE)));
            (map, unknown)
        };
        let (outbound, unknown_out) = build(Direction::Outbound);
        let (inbound, unknown_in) = build(Direction::Inbound);
        if let Some(previous) = previous {
            for (old, new) in [
                (&previous.outbound, &outbound),
                (&previous.inbound, &inbound),
            ] {
                for (service, handles) in old {
                    if !new.contains_key(service) {
                        handles.retire();
                    }
                }
            }
        }
        HandleTable {
            outbound,
            inbound,
            unknown: [unknown_out, unknown_in],
        }
    }

    fn map(&self, direction: Direction) -> &HashMap<Arc<str>, Arc<ServiceHandles>> {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    /// The handles for `service`, or the `unknown` ones.
    pub fn get(&self, direction: Direction, service: &str) -> &Arc<ServiceHandles> {
        self.map(direction)
            .get(service)
            .unwrap_or(&self.unknown[direction as usize])
    }

    /// Whether the table was built for exactly `services`.
    pub fn same_services<'a>(&self, services: impl IntoIterator<Item = &'a str>) -> bool {
        let mut n = 0;
        for s in services {
            n += 1;
            if !self.outbound.contains_key(s) {
                return false;
            }
        }
        n == self.outbound.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(m: &RequestMetrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        out
    }

    #[test]
    fn labels_are_bounded_to_snapshot_services_and_status_codes() {
        let m = RequestMetrics::default();
        let table = HandleTable::build(&m, ["backend", "web"], None);
        let backend = table.get(Direction::Outbound, "backend");
        backend.record(200, Duration::from_millis(3), false);
        backend.record(200, Duration::from_millis(3), false);
        backend.record(503, Duration::from_secs(2), true);
        backend.record(0, Duration::from_secs(1), true);
        backend.record(42, Duration::from_secs(1), true); // out of range → "0"
        // Names outside the snapshot (a raw path, an address) all land on `unknown`.
        for raw in ["/api/users/123", "10.0.0.7:8080"] {
            table
                .get(Direction::Inbound, raw)
                .record(200, Duration::ZERO, false);
        }
        assert_eq!(m.totals.get(), (7, 3));
        let text = encode(&m);
        for line in [
            r#"weft_requests_total{direction="outbound",service="backend",code="200"} 2"#,
            r#"weft_requests_total{direction="outbound",service="backend",code="503"} 1"#,
            r#"weft_requests_total{direction="outbound",service="backend",code="0"} 2"#,
            r#"weft_requests_total{direction="inbound",service="unknown",code="200"} 2"#,
            r#"weft_request_duration_seconds_count{direction="outbound",service="backend"} 5"#,
            r#"weft_request_duration_seconds_bucket{le="0.005",direction="outbound",service="backend"} 2"#,
            r#"weft_request_duration_seconds_bucket{le="+Inf",direction="outbound",service="backend"} 5"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("/api/users"), "{text}");
        // A known service without traffic shows no series.
        assert!(!text.contains("service=\"web\""), "{text}");
        assert!(!text.contains("10.0.0.7"), "{text}");
        assert!(text.contains(
            "weft_request_duration_seconds_sum{direction=\"outbound\",service=\"backend\"} 4.006"
        ));
    }

    #[test]
    fn a_new_table_keeps_the_handles_of_services_that_stay() {
        let m = RequestMetrics::default();
        let first = HandleTable::build(&m, ["a", "b"], None);
        let a1 = Arc::clone(first.get(Direction::Outbound, "a"));
        a1.counter(200);
        let second = HandleTable::build(&m, ["a", "c"], Some(&first));
        let a2 = second.get(Direction::Outbound, "a");
        assert!(Arc::ptr_eq(&a1, a2));
        assert!(second.same_services(["c", "a"]));
        assert!(!second.same_services(["a", "b"]));
        assert!(!second.same_services(["a"]));
        assert_eq!(
            &**second.get(Direction::Outbound, "b").service(),
            UNKNOWN_SERVICE
        );
    }

    #[test]
    fn series_of_a_service_that_left_are_deleted() {
        let m = RequestMetrics::default();
        let first = HandleTable::build(&m, ["a", "b"], None);
        let b = Arc::clone(first.get(Direction::Inbound, "b"));
        b.record(200, Duration::from_millis(1), false);
        first
            .get(Direction::Outbound, "a")
            .record(503, Duration::ZERO, true);
        assert!(encode(&m).contains("service=\"b\""));
        let second = HandleTable::build(&m, ["a"], Some(&first));
        let text = encode(&m);
        assert!(!text.contains("service=\"b\""), "{text}");
        assert!(
            text.contains(r#"weft_requests_total{direction="outbound",service="a",code="503"} 1"#)
        );
        // A request of `b` still in flight neither fails nor brings its series back.
        b.record(200, Duration::ZERO, false);
        b.record(404, Duration::ZERO, false);
        assert!(!encode(&m).contains("service=\"b\""));
        // Totals still count it.
        assert_eq!(m.totals.get(), (4, 1));
        // Coming back, `b` starts fresh.
        let third = HandleTable::build(&m, ["a", "b"], Some(&second));
        third
            .get(Direction::Inbound, "b")
            .record(200, Duration::ZERO, false);
        assert!(
            encode(&m)
                .contains(r#"weft_requests_total{direction="inbound",service="b",code="200"} 1"#)
        );
    }

    #[test]
    fn bucket_bounds_are_inclusive() {
        let h = DurationHistogram::default();
        h.observe(Duration::from_micros(100)); // le=0.0001
        h.observe(Duration::from_secs(120)); // +Inf
        assert_eq!(h.inner.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(
            h.inner.buckets[DURATION_BUCKETS.len()].load(Ordering::Relaxed),
            1
        );
        assert_eq!(h.count(), 2);
    }
}
