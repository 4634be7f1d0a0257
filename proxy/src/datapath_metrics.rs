//! The data path's Prometheus metrics. [`DataPathMetrics::register`] adds them to the proxy's
//! registry; the data path only increments them. [`DataPathMetrics::stats`] sums them up for
//! the proxy's periodic report to the control plane.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use weft_api::proto::ProxyStats;

/// `direction` label: `outbound` or `inbound`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
}

/// `direction` and `protocol` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// `tcp`, `http1` or `http2`.
    pub protocol: &'static str,
}

/// `direction` and `flow` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// `sent` (downstream to upstream) or `received` (upstream to downstream).
    pub flow: &'static str,
}

/// `decision` label: `allowed` or `blocked`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allowed` or `blocked`.
    pub decision: &'static str,
}

/// Outbound direction label value.
pub const OUTBOUND: &str = "outbound";
/// Inbound direction label value.
pub const INBOUND: &str = "inbound";

/// The data path's counters and gauges. Clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct DataPathMetrics {
    /// `weft_connections_total{direction,protocol}`.
    pub connections: Family<ConnectionLabels, Counter>,
    /// `weft_connections_active{direction}`.
    pub connections_active: Family<DirectionLabels, Gauge>,
    /// `weft_bytes_total{direction,flow}`.
    pub bytes: Family<BytesLabels, Counter>,
    /// `weft_passthrough_connections_total{decision}`.
    pub passthrough: Family<DecisionLabels, Counter>,
    /// `weft_authz_denied_total`.
    pub authz_denied: Counter,
    /// `weft_tls_handshake_failures_total{direction}`.
    pub tls_handshake_failures: Family<DirectionLabels, Counter>,
    /// `weft_loop_refused_total`: connections refused because they would loop to the proxy.
    pub loop_refused: Counter,
    /// The same connections and bytes summed over all labels.
    totals: Arc<Totals>,
}

/// Connection and byte counts over all labels, kept beside the labelled series so a report
/// needs no walk over label sets.
#[derive(Debug, Default)]
struct Totals {
    connections: AtomicU64,
    active: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl DataPathMetrics {
    /// New metrics, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the metrics under their full names (`weft_…`): use a registry without a
    /// prefix. Counters get their `_total` suffix from prometheus-client.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_connections",
            "Connections accepted by the data path",
            self.connections.clone(),
        );
        registry.register(
            "weft_connections_active",
            "Connections open in the data path",
            self.connections_active.clone(),
        );
        registry.register(
            "weft_bytes",
            "Bytes forwarded by the data path",
            self.bytes.clone(),
        );
        registry.register(
            "weft_passthrough_connections",
            "Connections to non-mesh destinations, allowed or blocked by the mesh's passthrough",
            self.passthrough.clone(),
        );
        registry.register(
            "weft_authz_denied",
            "Inbound connections refused by the mesh's permissions",
            self.authz_denied.clone(),
        );
        registry.register(
            "weft_tls_handshake_failures",
            "Mesh TLS handshakes that failed",
            self.tls_handshake_failures.clone(),
        );
        registry.register(
            "weft_loop_refused",
            "Connections refused because they would loop back into the proxy",
            self.loop_refused.clone(),
        );
    }

    /// Counts a passthrough decision.
    pub fn passthrough(&self, allowed: bool) {
        let decision = if allowed { "allowed" } else { "blocked" };
        self.passthrough
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    /// The passthrough count for `decision` (`allowed` or `blocked`).
    pub fn passthrough_count(&self, decision: &'static str) -> u64 {
        self.passthrough
            .get_or_create(&DecisionLabels { decision })
            .get()
    }

    pub(crate) fn tls_failure(&self, direction: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// The data path's part of the proxy's traffic report: connections and bytes in both
    /// directions. The request counts are the L7 layer's and stay 0 here.
    pub fn stats(&self) -> ProxyStats {
        let t = &self.totals;
        ProxyStats {
            requests_total: 0,
            request_errors_total: 0,
            connections_total: t.connections.load(Ordering::Relaxed),
            connections_active: t.active.load(Ordering::Relaxed),
            bytes_sent: t.bytes_sent.load(Ordering::Relaxed),
            bytes_received: t.bytes_received.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn opened(&self, direction: &'static str, protocol: &'static str) -> ActiveGuard {
        self.totals.connections.fetch_add(1, Ordering::Relaxed);
        self.totals.active.fetch_add(1, Ordering::Relaxed);
        self.connections
            .get_or_create(&ConnectionLabels {
                direction,
                protocol,
            })
            .inc();
        let gauge = self
            .connections_active
            .get_or_create(&DirectionLabels { direction })
            .clone();
        gauge.inc();
        ActiveGuard(gauge, self.totals.clone())
    }

    pub(crate) fn bytes(&self, direction: &'static str, sent: u64, received: u64) {
        self.totals.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        self.totals
            .bytes_received
            .fetch_add(received, Ordering::Relaxed);
        for (flow, n) in [("sent", sent), ("received", received)] {
            if n > 0 {
                self.bytes
                    .get_or_create(&BytesLabels { direction, flow })
                    .inc_by(n);
            }
        }
    }
}

/// Decrements `weft_connections_active` when the connection ends.
pub(crate) struct ActiveGuard(Gauge, Arc<Totals>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
        self.1.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_sum_connections_and_bytes_over_labels() {
        let m = DataPathMetrics::new();
        let clone = m.clone();
        let a = m.opened(OUTBOUND, "tcp");
        let b = clone.opened(INBOUND, "http1");
        m.bytes(OUTBOUND, 100, 7);
        clone.bytes(INBOUND, 20, 0);
        let s = m.stats();
        assert_eq!((s.connections_total, s.connections_active), (2, 2));
        assert_eq!((s.bytes_sent, s.bytes_received), (120, 7));
        assert_eq!((s.requests_total, s.request_errors_total), (0, 0));
        drop(a);
        assert_eq!(clone.stats().connections_active, 1);
        drop(b);
        assert_eq!(m.stats().connections_active, 0);
        assert_eq!(m.stats().connections_total, 2);
    }
}
