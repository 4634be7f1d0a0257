//! The live progress line: once per second on stderr, only on a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stats::{Counters, Snapshot};

/// A background thread that redraws one status line every second.
#[derive(Debug)]
pub struct ProgressLine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressLine {
    /// Starts drawing from `counters` if stderr is a terminal; otherwise the
    /// line stays silent. `measure_start` separates warm-up from measurement.
    pub fn start(counters: Vec<Arc<Counters>>, measure_start: Instant) -> ProgressLine {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || draw_loop(&counters, measure_start, &stop))
        });
        ProgressLine { stop, thread }
    }

    /// Stops drawing and clears the line.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn draw_loop(counters: &[Arc<Counters>], measure_start: Instant, stop: &AtomicBool) {
    let began = Instant::now();
    let mut prev = Snapshot::default();
    let mut prev_at = began;
    let mut next = began + Duration::from_secs(1);
    let mut err = std::io::stderr();
    while !stop.load(Ordering::Relaxed) {
        // Sleep in short steps so `finish` returns promptly.
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(50)));
            continue;
        }
        next += Duration::from_secs(1);
        let snap = counters
            .iter()
            .map(|c| c.snapshot())
            .fold(Snapshot::default(), |a, b| a + b);
        let secs = now.duration_since(prev_at).as_secs_f64().max(1e-9);
        let reqs = snap.requests - prev.requests;
        let mean_ms = if reqs > 0 {
            (snap.latency_ns - prev.latency_ns) as f64 / reqs as f64 / 1e6
        } else {
            0.0
        };
        let phase = if now < measure_start {
            "warmup "
        } else {
            "measure"
        };
        let mut line = format!(
            "[{:>6.1}s {phase}] {:>10.0} req/s  mean {:>8.3} ms  errors {}",
            now.duration_since(began).as_secs_f64(),
            reqs as f64 / secs,
            mean_ms,
            snap.errors,
        );
        if snap.bytes > 0 {
            let mbit = (snap.bytes - prev.bytes) as f64 * 8.0 / secs / 1e6;
            line.push_str(&format!("  {mbit:.0} Mbit/s"));
        }
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        prev = snap;
        prev_at = now;
    }
    if prev_at != began {
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}
