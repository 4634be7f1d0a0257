//! What a run prints: the text summary, the `--json` object, and the
//! `weft-bench mesh --json` schema it is designed to slot into.
//!
//! A single run's JSON is one object: run metadata (`date`, `machine`,
//! `command`, ...) with a [`Summary`] flattened into it. A `Summary` carries
//! exactly the per-path keys of SPEC §8 (`name`, `protocol`, `rps`, `p50_ms`,
//! `p99_ms`, `p999_ms`, `errors`) plus more, so `mesh` builds each
//! `paths[]` entry as a [`PathReport`]: a `Summary` plus the ratios and
//! sidecar figures only a mesh run knows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::load::{Measurement, per_second};
use crate::stats::ErrorCounts;

/// The protocol a run spoke, as named in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 cleartext.
    H2,
    /// gRPC unary over HTTP/2.
    Grpc,
    /// Raw TCP.
    Tcp,
}

/// Closed or open loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each connection sends as soon as its previous response is complete.
    Closed,
    /// Fixed total rate, latency corrected for coordinated omission.
    Open,
    /// TCP stream: bytes through an echo server, no per-request latency.
    Stream,
}

/// One measured path: the figures every report and every mesh path share.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What was measured: a target URL/address, or a mesh path name
    /// (`direct`, `weft`, `haproxy`, ...).
    pub name: String,
    /// The protocol spoken.
    pub protocol: Protocol,
    /// Closed, open or stream.
    pub mode: Mode,
    /// Concurrent connections.
    pub connections: usize,
    /// Open loop: the total rate asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_rps: Option<f64>,
    /// Length of the measurement window in seconds.
    pub duration_s: f64,
    /// Requests completed in the window, successful or not.
    pub requests: u64,
    /// Successful requests per second.
    pub rps: f64,
    /// Latency percentiles and extremes in milliseconds (0 when nothing was
    /// recorded).
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest request.
    pub max_ms: f64,
    /// Fastest request.
    pub min_ms: f64,
    /// Arithmetic mean.
    pub mean_ms: f64,
    /// Standard deviation.
    pub stdev_ms: f64,
    /// All errors.
    pub errors: u64,
    /// Errors by kind.
    pub errors_by_kind: ErrorCounts,
    /// Open loop: 99th percentile of the generator's own timer lateness. If
    /// it approaches the latencies measured, the generator is the bottleneck.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sched_lag_p99_ms: Option<f64>,
    /// TCP stream: payload bytes echoed back per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<f64>,
}

/// Histogram value (ns) at `q`, in milliseconds.
fn q_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        ns_to_ms(h.value_at_quantile(q) as f64)
    }
}

fn ns_to_ms(ns: f64) -> f64 {
    ns / 1e6
}

impl Summary {
    /// Builds the summary of a finished run.
    pub fn new(
        name: impl Into<String>,
        protocol: Protocol,
        mode: Mode,
        connections: usize,
        target_rps: Option<f64>,
        m: &Measurement,
    ) -> Summary {
        let r = &m.recorder;
        let h = &r.latency;
        let errors = r.errors.total();
        let nonempty = !h.is_empty();
        Summary {
            name: name.into(),
            protocol,
            mode,
            connections,
            target_rps,
            duration_s: m.elapsed.as_secs_f64(),
            requests: r.ok + errors,
            rps: m.rps(),
            p50_ms: q_ms(h, 0.5),
            p90_ms: q_ms(h, 0.9),
            p99_ms: q_ms(h, 0.99),
            p999_ms: q_ms(h, 0.999),
            max_ms: if nonempty {
                ns_to_ms(h.max() as f64)
            } else {
                0.0
            },
            min_ms: if nonempty {
                ns_to_ms(h.min() as f64)
            } else {
                0.0
            },
            mean_ms: if nonempty { ns_to_ms(h.mean()) } else { 0.0 },
            stdev_ms: if nonempty { ns_to_ms(h.stdev()) } else { 0.0 },
            errors,
            errors_by_kind: r.errors,
            sched_lag_p99_ms: (mode == Mode::Open).then(|| q_ms(&r.sched_lag, 0.99)),
            bytes_per_sec: (mode == Mode::Stream).then(|| per_second(r.bytes, m.elapsed)),
        }
    }

    /// A few lines for humans.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mode = match (self.mode, self.target_rps) {
            (Mode::Open, Some(r)) => format!("open loop at {r} req/s"),
            (Mode::Open, None) => "open loop".to_owned(),
            (Mode::Closed, _) => "closed loop".to_owned(),
            (Mode::Stream, _) => "stream".to_owned(),
        };
        s.push_str(&format!(
            "{} {} · {} · {} connections · {:.2} s\n",
            serde_json::to_value(self.protocol)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.name,
            mode,
            self.connections,
            self.duration_s,
        ));
        if let Some(bps) = self.bytes_per_sec {
            s.push_str(&format!(
                "  throughput  {:.1} MiB/s  ({:.2} Gbit/s)\n",
                bps / (1024.0 * 1024.0),
                bps * 8.0 / 1e9
            ));
        } else {
            s.push_str(&format!(
                "  requests    {}  ({:.1} req/s)\n",
                self.requests, self.rps
            ));
            s.push_str(&format!(
                "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3}, stdev {:.3})\n",
                self.p50_ms,
                self.p90_ms,
                self.p99_ms,
                self.p999_ms,
                self.max_ms,
                self.mean_ms,
                self.stdev_ms
            ));
        }
        if let Some(lag) = self.sched_lag_p99_ms {
            s.push_str(&format!("  generator timer lag p99 {lag:.3} ms\n"));
        }
        let e = &self.errors_by_kind;
        s.push_str(&format!(
            "  errors      {}  (connect {}, timeout {}, status {}, io {}, protocol {})\n",
            self.errors, e.connect, e.timeout, e.status, e.io, e.protocol
        ));
        s
    }
}

/// The `--json` object of a single `http`/`grpc`/`tcp` run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Always `weft-bench`.
    pub tool: &'static str,
    /// weft-bench's version.
    pub version: &'static str,
    /// When the run ended, UTC, RFC 3339.
    pub date: String,
    /// CPU model, CPU count and kernel.
    pub machine: String,
    /// The command line, for reproducing the run.
    pub command: String,
    /// Warm-up before the window, in seconds.
    pub warmup_s: f64,
    /// Worker threads of the generator.
    pub threads: usize,
    /// The figures.
    #[serde(flatten)]
    pub summary: Summary,
}

impl RunReport {
    /// Wraps a summary with the run's metadata.
    pub fn new(summary: Summary, warmup: Duration, threads: usize) -> RunReport {
        RunReport {
            tool: "weft-bench",
            version: env!("CARGO_PKG_VERSION"),
            date: utc_now_rfc3339(),
            machine: machine(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            warmup_s: warmup.as_secs_f64(),
            threads,
            summary,
        }
    }
}

/// The `weft-bench mesh --json` object (SPEC §8).
#[derive(Debug, Clone, Serialize)]
pub struct MeshReport {
    /// When the run ended, UTC, RFC 3339.
    pub date: String,
    /// CPU model, CPU count and kernel.
    pub machine: String,
    /// Repeated rounds; every figure is the median over them.
    pub rounds: u32,
    /// The command line.
    pub command: String,
    /// How the load was driven.
    pub settings: MeshSettings,
    /// One entry per measured path, grouped by protocol, each group's
    /// direct path first (`direct`, then `direct-h2`, `direct-grpc`).
    pub paths: Vec<PathReport>,
    /// Paths skipped (peer not installed, weft binaries not found) and the
    /// peers' versions.
    pub notes: Vec<String>,
    /// Paths that were meant to run but failed to start; the run exits
    /// non-zero when there are any.
    pub failures: Vec<String>,
}

/// The load every path of a mesh run gets.
#[derive(Debug, Clone, Serialize)]
pub struct MeshSettings {
    /// Connections of the closed-loop (throughput) runs.
    pub connections: usize,
    /// Connections of the open-loop (latency) runs.
    pub latency_connections: usize,
    /// The fixed rate of the latency runs, req/s.
    pub rate: f64,
    /// Unmeasured load before each run, seconds.
    pub warmup_s: f64,
    /// Length of each throughput run, seconds.
    pub duration_s: f64,
    /// Length of each latency run, seconds.
    pub latency_duration_s: f64,
    /// Upstream response body (and gRPC reply payload), bytes.
    pub body_size: usize,
    /// The generator's CPU.
    pub generator_cpu: usize,
    /// The sidecars' and the upstream's CPU.
    pub sidecar_cpu: usize,
    /// Idle-priority busy loops kept both CPUs awake.
    pub spin: bool,
    /// weft ran with iptables interception instead of explicit ports.
    pub weft_transparent: bool,
    /// Every path ran with weft's eBPF local redirect attached (`--ebpf`).
    pub ebpf: bool,
}

/// One `paths[]` entry of [`MeshReport`]: the path's [`Summary`] (medians
/// of the rounds) plus what only a side-by-side run can say.
///
/// `rps` is the closed-loop throughput; the latency keys (`p50_ms`, ...)
/// come from the open-loop runs at the fixed rate; `errors` counts every
/// failed request of every run of the path. Memory figures are per sidecar
/// (the larger of the two, to compare with a per-sidecar budget), with
/// each side also given on its own.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// Throughput and latency of this path; `name` is the path.
    #[serde(flatten)]
    pub summary: Summary,
    /// `none` for direct, else how the pair handled the app's traffic:
    /// `http` (parsed) or `tcp` (opaque bytes).
    pub proxy_mode: String,
    /// The rate achieved in the latency runs (should be the fixed rate).
    pub latency_rps: f64,
    /// Closed-loop throughput over the direct path's of the same
    /// `protocol` (0 when that one was not measured).
    pub rps_vs_direct: f64,
    /// p50 at the fixed rate minus the same protocol's direct path's.
    pub added_p50_ms: f64,
    /// p99 at the fixed rate minus the same protocol's direct path's.
    pub added_p99_ms: f64,
    /// Resident memory of the larger sidecar after one request, before
    /// load, MiB.
    pub rss_idle_mib: f64,
    /// Peak resident memory of the larger sidecar under the closed-loop
    /// load, MiB.
    pub rss_load_mib: f64,
    /// The outbound (client-side) sidecar's idle RSS, MiB.
    pub rss_idle_out_mib: f64,
    /// The inbound (server-side) sidecar's idle RSS, MiB.
    pub rss_idle_in_mib: f64,
    /// The outbound sidecar's peak RSS under load, MiB.
    pub rss_load_out_mib: f64,
    /// The inbound sidecar's peak RSS under load, MiB.
    pub rss_load_in_mib: f64,
    /// Both sidecars' CPU time (user + system) over the closed-loop run,
    /// divided by its requests, microseconds.
    pub cpu_us_per_req: f64,
    /// The kernel's part of `cpu_us_per_req` (system time): the sockets, TCP and the
    /// wake-ups, which every proxy in the same place pays too.
    pub cpu_sys_us_per_req: f64,
    /// The upstream app's CPU time per request over the same window.
    pub upstream_cpu_us_per_req: f64,
}

impl MeshReport {
    /// The table for humans, with the date, machine and command it came
    /// from: one block of rows per protocol, direct first.
    pub fn to_table(&self) -> String {
        let s = &self.settings;
        let mut protocols: Vec<&'static str> = Vec::new();
        for p in &self.paths {
            let name = protocol_title(p.summary.protocol);
            if !protocols.contains(&name) {
                protocols.push(name);
            }
        }
        let mut out = format!(
            "weft-bench mesh · {} · {}\n{}\n\
             {}, {} B responses · throughput: closed loop, {} connections, {} s ·\n\
             latency: {} req/s, {} connections, {} s, corrected for coordinated omission ·\n\
             medians of {} round(s) · generator on CPU {}, sidecars + upstream on CPU {}{}\n\n",
            self.date,
            self.machine,
            self.command,
            if protocols.is_empty() {
                "no path measured".to_owned()
            } else {
                protocols.join(", ")
            },
            s.body_size,
            s.connections,
            s.duration_s,
            s.rate,
            s.latency_connections,
            s.latency_duration_s,
            self.rounds,
            s.generator_cpu,
            s.sidecar_cpu,
            if s.spin {
                " (idle CPUs kept awake)"
            } else {
                ""
            },
        );
        // As wide as the longest name (`haproxy-echo-tcp`), at least 12.
        let w = self
            .paths
            .iter()
            .map(|p| p.summary.name.chars().count())
            .fold(12, usize::max);
        out.push_str(&format!(
            "{:<w$} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>13} {:>13} {:>9} {:>7} {:>7}\n",
            "path",
            "req/s",
            "×direct",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "+p50 ms",
            "+p99 ms",
            "RSS idle o/i",
            "RSS load o/i",
            "CPU µs/req",
            "of sys",
            "errors",
        ));
        for (i, p) in self.paths.iter().enumerate() {
            let sm = &p.summary;
            if i > 0 && self.paths[i - 1].summary.protocol != sm.protocol {
                out.push('\n');
            }
            let (rss_idle, rss_load, cpu, sys) = if p.proxy_mode == "none" {
                (
                    "–".to_owned(),
                    "–".to_owned(),
                    "–".to_owned(),
                    "–".to_owned(),
                )
            } else {
                (
                    format!("{:.1}/{:.1}", p.rss_idle_out_mib, p.rss_idle_in_mib),
                    format!("{:.1}/{:.1}", p.rss_load_out_mib, p.rss_load_in_mib),
                    format!("{:.1}", p.cpu_us_per_req),
                    format!("{:.1}", p.cpu_sys_us_per_req),
                )
            };
            out.push_str(&format!(
                "{:<w$} {:>9.0} {:>8.2} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>13} {:>13} {:>9} {:>7} {:>7}\n",
                sm.name,
                sm.rps,
                p.rps_vs_direct,
                sm.p50_ms,
                sm.p99_ms,
                sm.p999_ms,
                p.added_p50_ms,
                p.added_p99_ms,
                rss_idle,
                rss_load,
                cpu,
                sys,
                sm.errors,
            ));
        }
        out.push_str(
            "\n×direct, +p50, +p99: against the direct path of the same protocol. \
             RSS in MiB (outbound/inbound sidecar); CPU µs/req: both sidecars' user+system time \
             per request under closed-loop load, of which `of sys` is the kernel's (system) \
             time.\n",
        );
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        for f in &self.failures {
            out.push_str(&format!("FAILED: {f}\n"));
        }
        out
    }
}

/// How the table's heading names a protocol.
fn protocol_title(p: Protocol) -> &'static str {
    match p {
        Protocol::Http1 => "HTTP/1.1 keep-alive",
        Protocol::H2 => "h2c",
        Protocol::Grpc => "gRPC unary",
        Protocol::Tcp => "raw TCP ping-pong",
    }
}

/// CPU model, CPU count and kernel release, from /proc.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("{model} x{}, Linux {kernel}", crate::cpu::available())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Formats seconds since the Unix epoch (UTC).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Recorder;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_083_199), "2026-11-30T23:59:59Z");
    }

    fn summary() -> Summary {
        let mut recorder = Recorder::default();
        recorder.record_ok(Duration::from_micros(68));
        let m = Measurement {
            recorder,
            elapsed: Duration::from_secs(1),
            threads: 1,
        };
        Summary::new("direct", Protocol::Http1, Mode::Open, 16, Some(1000.0), &m)
    }

    #[test]
    fn mesh_paths_carry_the_spec_keys() {
        let path = PathReport {
            summary: summary(),
            proxy_mode: "none".into(),
            latency_rps: 1000.0,
            rps_vs_direct: 1.0,
            added_p50_ms: 0.0,
            added_p99_ms: 0.0,
            rss_idle_mib: 0.0,
            rss_load_mib: 0.0,
            rss_idle_out_mib: 0.0,
            rss_idle_in_mib: 0.0,
            rss_load_out_mib: 0.0,
            rss_load_in_mib: 0.0,
            cpu_us_per_req: 0.0,
            cpu_sys_us_per_req: 0.0,
            upstream_cpu_us_per_req: 0.0,
        };
        let report = MeshReport {
            date: utc_now_rfc3339(),
            machine: machine(),
            rounds: 3,
            command: String::new(),
            settings: MeshSettings {
                connections: 32,
                latency_connections: 16,
                rate: 1000.0,
                warmup_s: 1.0,
                duration_s: 10.0,
                latency_duration_s: 10.0,
                body_size: 1024,
                generator_cpu: 0,
                sidecar_cpu: 1,
                spin: true,
                weft_transparent: false,
                ebpf: false,
            },
            paths: vec![path.clone()],
            notes: vec![],
            failures: vec![],
        };
        assert!(report.to_table().contains("direct"));
        // A long name widens the path column for every row.
        let mut long = path;
        long.summary.name = "haproxy-echo-tcp".into();
        long.summary.protocol = Protocol::Tcp;
        let wide = MeshReport {
            paths: vec![report.paths[0].clone(), long],
            ..report.clone()
        };
        let table = wide.to_table();
        for name in ["path", "direct", "haproxy-echo-tcp"] {
            let padded = format!("{name:<16} ");
            assert!(
                table.lines().any(|l| l.starts_with(&padded)),
                "{name} not in a 16-wide column:\n{table}"
            );
        }
        assert!(table.contains("raw TCP ping-pong"), "{table}");
        let v = serde_json::to_value(&report).unwrap();
        for key in ["date", "machine", "rounds", "paths"] {
            assert!(v.get(key).is_some(), "{key}");
        }
        let p = &v["paths"][0];
        for key in [
            "name",
            "protocol",
            "rps",
            "rps_vs_direct",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "added_p50_ms",
            "added_p99_ms",
            "rss_idle_mib",
            "rss_load_mib",
            "cpu_us_per_req",
            "cpu_sys_us_per_req",
            "errors",
        ] {
            assert!(p.get(key).is_some(), "{key}");
        }
        assert_eq!(p["protocol"], "http1");
        assert!(p["errors"].is_u64());
        assert!((p["p50_ms"].as_f64().unwrap() - 0.068).abs() < 0.001);
    }

    #[test]
    fn run_report_flattens_the_summary() {
        let v = serde_json::to_value(RunReport::new(summary(), Duration::ZERO, 1)).unwrap();
        assert_eq!(v["tool"], "weft-bench");
        assert_eq!(v["name"], "direct");
        assert_eq!(v["mode"], "open");
        assert!(v.get("sched_lag_p99_ms").is_some());
        assert!(v.get("bytes_per_sec").is_none());
    }
}
