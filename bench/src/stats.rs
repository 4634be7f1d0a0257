//! What a run counts: latency histograms, errors by kind, and the live
//! counters the progress line reads.
//!
//! Each worker thread owns one [`Recorder`] (no locks on the request path);
//! the runner merges them when the run ends.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold (100 s); longer samples are clamped.
const MAX_TRACKABLE_NS: u64 = 100_000_000_000;

/// Why a request failed. Each kind is counted separately in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The TCP connection (or the protocol handshake on it) could not be made.
    Connect,
    /// No complete response within `--timeout`.
    Timeout,
    /// A response arrived with a non-success status (HTTP non-2xx, gRPC status).
    Status,
    /// The connection broke (reset, EOF) while a request was in flight.
    Io,
    /// The peer spoke the protocol wrongly (parse error, bad frame, bad echo).
    Protocol,
}

impl ErrorKind {
    /// Whether the connection is still usable after this error.
    pub fn keeps_connection(self) -> bool {
        matches!(self, ErrorKind::Status)
    }
}

/// Error counts by kind; serialises as `{"connect": 0, "timeout": 0, ...}`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// See [`ErrorKind::Connect`].
    pub connect: u64,
    /// See [`ErrorKind::Timeout`].
    pub timeout: u64,
    /// See [`ErrorKind::Status`].
    pub status: u64,
    /// See [`ErrorKind::Io`].
    pub io: u64,
    /// See [`ErrorKind::Protocol`].
    pub protocol: u64,
}

impl ErrorCounts {
    /// Counts one error of `kind`.
    pub fn add(&mut self, kind: ErrorKind) {
        let slot = match kind {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Status => &mut self.status,
            ErrorKind::Io => &mut self.io,
            ErrorKind::Protocol => &mut self.protocol,
        };
        *slot += 1;
    }

    /// All errors, whatever their kind.
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.status + self.io + self.protocol
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.status += other.status;
        self.io += other.io;
        self.protocol += other.protocol;
    }
}

/// A latency histogram in nanoseconds, 1 ns to 100 s, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds and precision are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"))
}

/// Everything measured during the measurement window (warm-up excluded).
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Latency of successful requests, in nanoseconds. In open loop each sample
    /// is measured from the request's intended send time.
    pub latency: Histogram<u64>,
    /// Open loop only: how late the generator's timer woke for a request whose
    /// connection was idle, in nanoseconds. Large values mean the generator,
    /// not the target, was the bottleneck.
    pub sched_lag: Histogram<u64>,
    /// Failed requests by kind.
    pub errors: ErrorCounts,
    /// Successful requests.
    pub ok: u64,
    /// Payload bytes received (TCP stream mode).
    pub bytes: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: new_histogram(),
            sched_lag: new_histogram(),
            errors: ErrorCounts::default(),
            ok: 0,
            bytes: 0,
        }
    }
}

impl Recorder {
    /// Records one successful request.
    pub fn record_ok(&mut self, latency: Duration) {
        self.ok += 1;
        self.latency.saturating_record(duration_ns(latency));
    }

    /// Records how late the timer fired for an idle connection.
    pub fn record_lag(&mut self, lag: Duration) {
        self.sched_lag.saturating_record(duration_ns(lag));
    }

    /// Folds another recorder (from another worker) into this one.
    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides, so `add` cannot fail; clamp if it ever did.
        if self.latency.add(&other.latency).is_err() {
            for v in other.latency.iter_recorded() {
                self.latency
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        if self.sched_lag.add(&other.sched_lag).is_err() {
            for v in other.sched_lag.iter_recorded() {
                self.sched_lag
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        self.errors.merge(&other.errors);
        self.ok += other.ok;
        self.bytes += other.bytes;
    }
}

/// Live counters for the progress line, one per worker thread so the request
/// path never shares a cache line with another thread.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests completed, warm-up included.
    pub requests: AtomicU64,
    /// Errors, warm-up included.
    pub errors: AtomicU64,
    /// Sum of latencies of completed requests, in nanoseconds.
    pub latency_ns: AtomicU64,
    /// Payload bytes received.
    pub bytes: AtomicU64,
}

impl Counters {
    /// Counts one completed request.
    pub fn request(&self, latency: Duration, failed: bool) {
        self.requests.fetch_add(1, Relaxed);
        self.latency_ns.fetch_add(duration_ns(latency), Relaxed);
        if failed {
            self.errors.fetch_add(1, Relaxed);
        }
    }

    /// Reads all counters at once.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency_ns: self.latency_ns.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

/// A point-in-time copy of [`Counters`], summable across threads.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    /// See [`Counters::requests`].
    pub requests: u64,
    /// See [`Counters::errors`].
    pub errors: u64,
    /// See [`Counters::latency_ns`].
    pub latency_ns: u64,
    /// See [`Counters::bytes`].
    pub bytes: u64,
}

impl std::ops::Add for Snapshot {
    type Output = Snapshot;
    fn add(self, o: Snapshot) -> Snapshot {
        Snapshot {
            requests: self.requests + o.requests,
            errors: self.errors + o.errors,
            latency_ns: self.latency_ns + o.latency_ns,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX`.
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_everything() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        a.record_ok(Duration::from_micros(100));
        b.record_ok(Duration::from_micros(300));
        b.errors.add(ErrorKind::Timeout);
        a.merge(&b);
        assert_eq!(a.ok, 2);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.errors.timeout, 1);
        assert_eq!(a.errors.total(), 1);
    }

    #[test]
    fn huge_latency_is_clamped_not_lost() {
        let mut r = Recorder::default();
        r.record_ok(Duration::from_secs(1000));
        assert_eq!(r.latency.len(), 1);
    }
}
