//! The discovery client: registers this proxy's Dataplane, applies each snapshot the control
//! plane pushes (as a whole, or not at all), and ACKs or NACKs it. A snapshot may leave out
//! the parts that did not change; they are taken from the snapshot applied last
//! ([`weft_api::parts::merge`]), which is kept complete. With
//! [`Discovery::with_stats`] it also reports the proxy's traffic totals (`ProxyStats`) every
//! interval, for `weftctl inspect dataplanes`.
//!
//! Static stability: the last good snapshot stays applied while the control plane is away;
//! the client reconnects with capped exponential backoff and jitter, to the next control-plane
//! replica when it was given several ([`crate::cp`]), and `weft_control_plane_connected` says
//! whether it is connected.

use crate::cp::CpChannels;
use crate::identity::TokenSource;
use crate::metrics::{Metrics, ResultLabel};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use weft_api::parts;
use weft_api::proto::discovery_client::DiscoveryClient as GrpcClient;
use weft_api::proto::discovery_request::Kind;
use weft_api::proto::{Ack, DiscoveryRequest, Nack, ProxyStats, Register, Snapshot};

/// How often a proxy reports its traffic totals by default.
pub const STATS_INTERVAL: Duration = Duration::from_secs(10);
/// The longest interval between traffic reports, whatever `--stats-interval` says.
const MAX_STATS_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Where the discovery client reads the traffic totals it reports.
///
/// Any `Fn() -> ProxyStats` is a source. `weft-proxy run` fills the connection and byte
/// counts from the data path ([`crate::datapath_metrics::DataPathMetrics::stats`]); the
/// request counts come from the L7 layer and are 0 without one.
pub trait StatsSource: Send + Sync {
    /// The totals since the proxy started.
    fn stats(&self) -> ProxyStats;
}

impl<F: Fn() -> ProxyStats + Send + Sync> StatsSource for F {
    fn stats(&self) -> ProxyStats {
        self()
    }
}

/// Periodic traffic reports: their source and interval.
#[derive(Clone)]
struct Reporting {
    source: Arc<dyn StatsSource>,
    every: Duration,
}

/// Reconnect delays: doubling from `initial` up to `max`, each scaled by a random 50–100%.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// First delay.
    pub initial: Duration,
    /// Cap.
    pub max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(15),
        }
    }
}

impl Reconnect {
    /// The delay before attempt `failures` (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let capped = exp.min(self.max);
        capped.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// Applies a snapshot; an error is the NACK reason.
pub type Apply = Arc<dyn Fn(&Snapshot) -> Result<(), String> + Send + Sync>;

/// The discovery client of one proxy.
pub struct Discovery {
    replicas: CpChannels,
    dataplane: String,
    token: TokenSource,
    metrics: Arc<Metrics>,
    reconnect: Reconnect,
    applied: watch::Sender<Option<Arc<Snapshot>>>,
    reporting: Option<Reporting>,
}

impl Discovery {
    /// A client that registers `dataplane` (YAML or JSON text) with the control plane over
    /// `replicas` (a [`Channel`], or [`CpChannels`] to move on to another replica when one
    /// fails).
    pub fn new(
        replicas: impl Into<CpChannels>,
        dataplane: String,
        token: TokenSource,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (applied, _) = watch::channel(None);
        Discovery {
            replicas: replicas.into(),
            dataplane,
            token,
            metrics,
            reconnect: Reconnect::default(),
            applied,
            reporting: None,
        }
    }

    /// Also reports `source`'s totals to the control plane every `every` (at least 1 ms)
    /// while connected, the first one `every` after the stream opens.
    pub fn with_stats(mut self, source: Arc<dyn StatsSource>, every: Duration) -> Self {
        self.reporting = Some(Reporting {
            source,
            every: every.max(Duration::from_millis(1)),
        });
        self
    }

    /// The last snapshot applied (for `/config` and readiness).
    pub fn applied(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.applied.subscribe()
    }

    fn token(&self) -> Result<String, String> {
        let t = match &self.token {
            TokenSource::Inline(t) => t.clone(),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("dataplane token file {}: {e}", p.display()))?,
        };
        Ok(t.trim().to_string())
    }

    /// Runs until `shutdown`: connects, applies snapshots with `apply`, reconnects on failure.
    /// On shutdown it ends its stream cleanly, which deregisters the dataplane.
    pub async fn run(&self, apply: Apply, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            // The session watches `shutdown` itself: cancelling it from out here could drop an
            // open stream before its clean end, and the control plane would then mark the
            // dataplane offline instead of deregistering it.
            let (replica, channel) = self.replicas.current();
            let outcome = self.session(channel, &apply, &shutdown).await;
            // A stream that was up counts as a success: after it breaks, the next attempt
            // comes after the first backoff step, not after the failures of long ago.
            if self.metrics.cp_connected.get() == 1 {
                failures = 0;
            }
            self.metrics.cp_connected.set(0);
            match outcome {
                Ok(true) => return,
                Ok(false) => failures = 1,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, control_plane = %self.replicas.address(replica),
                        "discovery stream failed; keeping the last configuration");
                }
            }
            // The replica ended the stream (it is shutting down) or failed: the next attempt
            // goes to the next one. Replicas serve the same configuration, so moving on after
            // any failure costs nothing.
            self.replicas.failed(replica);
            let delay = self.reconnect.delay(failures);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One stream over `channel`. `Ok(true)`: ended by shutdown; `Ok(false)`: the server
    /// closed it.
    async fn session(
        &self,
        channel: Channel,
        apply: &Apply,
        shutdown: &CancellationToken,
    ) -> Result<bool, String> {
        let token = self.token()?;
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
        let register = Register {
            dataplane: self.dataplane.clone(),
            proxy_version: env!("CARGO_PKG_VERSION").into(),
            keeps_parts: parts::ALL.iter().map(|p| *p as i32).collect(),
        };
        tx.send(DiscoveryRequest {
            kind: Some(Kind::Register(register)),
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the dataplane token is not valid ASCII".to_string())?;
        req.metadata_mut().insert("authorization", bearer);
        let mut client = GrpcClient::new(channel);
        let mut stream = tokio::select! {
            r = client.stream(req) => r
                .map_err(|s| format!("{}: {}", s.code(), s.message()))?
                .into_inner(),
            _ = shutdown.cancelled() => return Ok(true),
        };
        self.metrics.cp_connected.set(1);
        tracing::info!("connected to the control plane");
        let mut reports = self.reporting.as_ref().map(|r| {
            // Capped: an `Instant` cannot go arbitrarily far ahead, and a flag may ask for that.
            let period = r.every.min(MAX_STATS_INTERVAL);
            let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (every, r.source.clone())
        });
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                stats = next_report(&mut reports) => {
                    match tx.try_send(DiscoveryRequest { kind: Some(Kind::Stats(stats)) }) {
                        // Full: ACKs are queued; the next report carries the same totals.
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        Err(mpsc::error::TrySendError::Closed(_)) => return Err("the stream closed".into()),
                    }
                }
                _ = shutdown.cancelled() => {
                    // End our side cleanly; the control plane deregisters us and closes its side.
                    drop(tx);
                    let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Ok(Some(_)) = stream.message().await {} }).await;
                    return Ok(true);
                }
            };
            let mut snap = match msg {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(false),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            };
            // The parts it keeps come from the snapshot applied last (on any stream: the
            // first snapshot of a stream is complete).
            let last = self.applied.borrow().clone();
            let outcome = parts::merge(&mut snap, last.as_deref()).and_then(|()| apply(&snap));
            drop(last);
            let reply = match outcome {
                Ok(()) => {
                    self.metrics
                        .config_updates
                        .get_or_create(&ResultLabel { result: "ack" })
                        .inc();
                    tracing::info!(version = %snap.version, "applied configuration");
                    let reply = Kind::Ack(Ack {
                        version: snap.version.clone(),
                        nonce: snap.nonce.clone(),
                    });
                    self.applied.send_replace(Some(Arc::new(snap)));
                    reply
                }
                Err(reason) => {
                    self.metrics
                        .config_updates
                        .get_or_create(&ResultLabel { result: "nack" })
                        .inc();
                    tracing::warn!(version = %snap.version, %reason, "refused configuration");
                    Kind::Nack(Nack {
                        version: snap.version.clone(),
                        nonce: snap.nonce.clone(),
                        reason,
                    })
                }
            };
            if tx
                .send(DiscoveryRequest { kind: Some(reply) })
                .await
                .is_err()
            {
                return Err("the stream closed".into());
            }
        }
    }
}

/// Waits for the next report tick and reads the totals; never resolves without reporting.
async fn next_report(
    reports: &mut Option<(tokio::time::Interval, Arc<dyn StatsSource>)>,
) -> ProxyStats {
    match reports {
        Some((every, source)) => {
            every.tick().await;
            source.stats()
        }
        None => std::future::pending().await,
    }
}

/// Replaces `{{ key }}` (and `{{key}}`) in a dataplane template with `--dataplane-var` values;
/// a placeholder without a value is an error naming it.
pub fn render_template(template: &str, vars: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "unterminated `{{` in the dataplane file".to_string())?;
        let key = after[..end].trim().trim_start_matches('.');
        let value = vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("the dataplane file uses {{{{ {key} }}}} but no --dataplane-var {key}=… was given"))?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_vars_and_name_missing_ones() {
        let vars = vec![
            ("name".to_string(), "web-1".to_string()),
            ("port".to_string(), "8080".to_string()),
        ];
        assert_eq!(
            render_template("name: {{ name }}\nport: {{port}}", &vars).unwrap(),
            "name: web-1\nport: 8080"
        );
        let err = render_template("address: {{ address }}", &vars).unwrap_err();
        assert!(err.contains("address"), "{err}");
        assert!(render_template("a: {{ name", &vars).is_err());
    }

    #[test]
    fn reconnect_delays_grow_and_cap() {
        let r = Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert!(r.delay(1) <= Duration::from_millis(100));
        assert!(r.delay(1) >= Duration::from_millis(50));
        assert!(r.delay(20) <= Duration::from_secs(2));
        assert!(r.delay(20) >= Duration::from_secs(1));
    }
}
