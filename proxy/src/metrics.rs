//! The proxy's Prometheus metrics: one [`Metrics`] value holds every metric and
//! the registry they are exposed from (admin `/metrics`, and later the mesh's
//! metrics backend). Each concern adds its metrics as fields here.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set `{result="ok|error"}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// All of the proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `weft_identity_cert_expiry_timestamp_seconds`: notAfter of the current
    /// workload certificate, seconds since the Unix epoch (0 when none).
    pub cert_expiry: Gauge<i64, AtomicI64>,
    /// `weft_identity_certify_total{result}`: certify attempts.
    pub certify: Family<ResultLabel, Counter>,
    /// `weft_control_plane_connected`: 1 while the discovery stream is up.
    pub cp_connected: Gauge<i64, AtomicI64>,
    /// `weft_config_updates_total{result}`: snapshots applied (`ack`) or refused (`nack`).
    pub config_updates: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        Self::with_extra(|_| {})
    }

    /// Creates and registers every metric, plus those `extra` registers (the data path's).
    pub fn with_extra(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        extra(&mut registry);
        let cp_connected = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "weft_control_plane_connected",
            "1 while the proxy's discovery stream to the control plane is up",
            cp_connected.clone(),
        );
        let config_updates = Family::<ResultLabel, Counter>::default();
        registry.register(
            "weft_config_updates",
            "Configuration snapshots received, by result (ack or nack)",
            config_updates.clone(),
        );
        let cert_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "weft_identity_cert_expiry_timestamp_seconds",
            "notAfter of the proxy's current mesh certificate, in seconds since the Unix epoch",
            cert_expiry.clone(),
        );
        let certify = Family::<ResultLabel, Counter>::default();
        registry.register(
            "weft_identity_certify",
            "Certificate requests to the control plane, by result",
            certify.clone(),
        );
        Self {
            registry,
            cert_expiry,
            certify,
            cp_connected,
            config_updates,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_identity_metrics() {
        let m = Metrics::new();
        m.cert_expiry.set(1_700_000_000);
        m.certify.get_or_create(&ResultLabel { result: "ok" }).inc();
        let text = m.encode();
        assert!(
            text.contains("weft_identity_cert_expiry_timestamp_seconds 1700000000"),
            "{text}"
        );
        assert!(
            text.contains("weft_identity_certify_total{result=\"ok\"} 1"),
            "{text}"
        );
    }
}
