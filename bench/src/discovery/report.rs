//! What `weft-bench discovery` prints: a table, or one `--json` object.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::Config;

/// The targets of SPEC §4 and the discovery issue.
pub const TARGET_P99_MS: f64 = 100.0;
/// Control-plane RSS target, MiB.
pub const TARGET_RSS_MIB: f64 = 100.0;

/// One policy apply and its propagation.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// 1-based.
    pub round: u32,
    /// The PUT's own latency (request sent to response read).
    pub apply_ms: f64,
    /// Apply → ACK over proxies.
    pub p50_ms: f64,
    /// 99th percentile over proxies.
    pub p99_ms: f64,
    /// The last proxy.
    pub max_ms: f64,
    /// Control-plane CPU time from the apply to the last ACK (absent in-process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cp_cpu_ms: Option<f64>,
    /// Snapshots pushed from the apply until the end of the pause after the round (N is ideal).
    pub pushes: usize,
    /// The bytes of those snapshots (as received: without the parts they kept), KiB.
    pub pushed_kib: f64,
    #[serde(skip)]
    latencies: Vec<Duration>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Round {
    /// A round from each proxy's apply → ACK latency.
    pub fn new(
        round: u32,
        apply: Duration,
        mut latencies: Vec<Duration>,
        cp_cpu: Option<Duration>,
        pushes: usize,
        pushed_bytes: usize,
    ) -> Round {
        latencies.sort_unstable();
        Round {
            round,
            apply_ms: ms(apply),
            p50_ms: ms(percentile(&latencies, 50.0)),
            p99_ms: ms(percentile(&latencies, 99.0)),
            max_ms: ms(latencies.last().copied().unwrap_or_default()),
            cp_cpu_ms: cp_cpu.map(ms),
            pushes,
            pushed_kib: pushed_bytes as f64 / 1024.0,
            latencies,
        }
    }

    /// The progress line.
    pub fn to_line(&self) -> String {
        format!(
            "round {}: apply {:.1} ms, apply→ACK p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.round, self.apply_ms, self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always `weft-bench discovery`.
    pub tool: String,
    /// weft-bench's version.
    pub version: String,
    /// When (UTC).
    pub date: String,
    /// CPU and kernel.
    pub machine: String,
    /// The command line.
    pub command: String,
    /// Simulated proxies.
    pub proxies: usize,
    /// Services they are spread over.
    pub services: usize,
    /// HTTP/2 connections their streams share.
    pub connections: usize,
    /// Streams per connection.
    pub streams_per_connection: usize,
    /// Proxies waiting for their first snapshot at once.
    pub register_concurrency: usize,
    /// Start of registration until every proxy has ACKed its first snapshot, seconds.
    pub registration_s: f64,
    /// Start of registration until every proxy's snapshot lists every endpoint, seconds.
    pub converged_s: f64,
    /// Largest snapshot seen, bytes.
    pub snapshot_bytes: usize,
    /// What latencies are measured from and to.
    pub latency: String,
    /// Over every proxy of every round.
    pub p50_ms: f64,
    /// Over every proxy of every round.
    pub p99_ms: f64,
    /// Over every proxy of every round.
    pub max_ms: f64,
    /// Median of the PUT latencies.
    pub apply_p50_ms: f64,
    /// Control-plane RSS after convergence, at rest, MiB.
    pub cp_rss_idle_mib: Option<f64>,
    /// Largest control-plane RSS sampled (every 5 ms) during the rounds, MiB.
    pub cp_rss_push_peak_mib: Option<f64>,
    /// Control-plane lifetime peak RSS (`VmHWM`, includes registration), MiB.
    pub cp_rss_hwm_mib: Option<f64>,
    /// p99 target, ms.
    pub target_p99_ms: f64,
    /// RSS target, MiB.
    pub target_rss_mib: f64,
    /// Every round.
    pub rounds: Vec<Round>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl Report {
    /// Assembles the report.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &Config,
        connections: usize,
        registration: Duration,
        converged: Duration,
        snapshot_bytes: usize,
        rounds: Vec<Round>,
        rss_idle: Option<u64>,
        rss_push_peak: Option<u64>,
        rss_hwm: Option<u64>,
    ) -> Report {
        let mut all: Vec<Duration> = rounds
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        all.sort_unstable();
        let mut applies: Vec<Duration> = rounds
            .iter()
            .map(|r| Duration::from_secs_f64(r.apply_ms / 1000.0))
            .collect();
        applies.sort_unstable();
        Report {
            tool: "weft-bench discovery".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            date: crate::report::utc_now_rfc3339(),
            machine: crate::report::machine(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            proxies: cfg.proxies,
            services: cfg.services,
            connections,
            streams_per_connection: cfg.streams_per_connection,
            register_concurrency: cfg.register_concurrency,
            registration_s: registration.as_secs_f64(),
            converged_s: converged.as_secs_f64(),
            snapshot_bytes,
            latency: "from just before the PUT of the policy to the proxy's ACK of the first snapshot holding it".into(),
            p50_ms: ms(percentile(&all, 50.0)),
            p99_ms: ms(percentile(&all, 99.0)),
            max_ms: ms(all.last().copied().unwrap_or_default()),
            apply_p50_ms: ms(percentile(&applies, 50.0)),
            cp_rss_idle_mib: rss_idle.map(mib),
            cp_rss_push_peak_mib: rss_push_peak.map(mib),
            cp_rss_hwm_mib: rss_hwm.map(mib),
            target_p99_ms: TARGET_P99_MS,
            target_rss_mib: TARGET_RSS_MIB,
            rounds,
        }
    }

    /// The text table.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "weft discovery: {} proxies, {} services, {} connections x {} streams, {} rounds",
            self.proxies,
            self.services,
            self.connections,
            self.streams_per_connection,
            self.rounds.len()
        );
        let _ = writeln!(
            s,
            "registration: every proxy has a snapshot after {:.2} s; every snapshot lists all {} endpoints after {:.2} s",
            self.registration_s, self.proxies, self.converged_s
        );
        let _ = writeln!(
            s,
            "snapshot: {:.1} KiB per proxy (complete)",
            self.snapshot_bytes as f64 / 1024.0
        );
        let _ = writeln!(s, "latency: {}", self.latency);
        let _ = writeln!(
            s,
            "\n{:>5}  {:>9}  {:>8}  {:>8}  {:>8}  {:>10}  {:>6}  {:>10}",
            "round", "apply_ms", "p50_ms", "p99_ms", "max_ms", "cp_cpu_ms", "pushes", "pushed_kib"
        );
        for r in &self.rounds {
            let cpu = r.cp_cpu_ms.map_or("-".into(), |c| format!("{c:.0}"));
            let _ = writeln!(
                s,
                "{:>5}  {:>9.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>10}  {:>6}  {:>10.0}",
                r.round, r.apply_ms, r.p50_ms, r.p99_ms, r.max_ms, cpu, r.pushes, r.pushed_kib
            );
        }
        let _ = writeln!(
            s,
            "{:>5}  {:>9.1}  {:>8.1}  {:>8.1}  {:>8.1}\n",
            "all", self.apply_p50_ms, self.p50_ms, self.p99_ms, self.max_ms
        );
        let fmt = |v: Option<f64>| v.map_or("-".into(), |m| format!("{m:.1} MiB"));
        let _ = writeln!(
            s,
            "control-plane RSS: idle {}, peak during pushes {}, lifetime peak (VmHWM) {}",
            fmt(self.cp_rss_idle_mib),
            fmt(self.cp_rss_push_peak_mib),
            fmt(self.cp_rss_hwm_mib)
        );
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let rss = self.cp_rss_hwm_mib.or(self.cp_rss_push_peak_mib);
        let _ = writeln!(
            s,
            "targets: p99 <= {:.0} ms: {} ({:.1} ms); RSS <= {:.0} MiB: {}",
            self.target_p99_ms,
            verdict(self.p99_ms <= self.target_p99_ms),
            self.p99_ms,
            self.target_rss_mib,
            rss.map_or("not measured (in-process)".into(), |r| format!(
                "{} ({r:.1} MiB peak)",
                verdict(r <= self.target_rss_mib)
            )),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(1));
        let r = Round::new(1, Duration::from_millis(2), v, None, 100, 4096);
        assert_eq!(r.max_ms, 100.0);
        assert!(r.to_line().contains("p99 99.0 ms"));
    }
}
