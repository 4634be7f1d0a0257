//! The request engine: worker threads, connections, the closed and open loop,
//! and coordinated-omission correction.
//!
//! # Threads
//! `threads` OS threads each run a current-thread tokio runtime with a
//! [`LocalSet`]; connection `j` lives on thread `j % threads` for the whole
//! run. A thread's connections share one [`Recorder`] through an `Rc`, so the
//! request path takes no lock and touches no other thread's memory. Threads
//! can be pinned to CPUs (`--cpu`).
//!
//! # Phases
//! Every thread first opens its connections, then all threads meet at a
//! barrier and agree on a common `start`. Requests whose send time falls in
//! `[start, start + warmup)` are made but not recorded; the measurement
//! window follows, ending after `duration` or once each connection has made
//! its share of `--requests`.
//!
//! # Closed loop
//! Each connection sends its next request as soon as the previous response
//! is complete. Latency runs from send to the end of the response body.
//!
//! # Open loop and coordinated omission
//! With a total rate `R` over `C` connections, connection `j` owns the fixed
//! schedule `t_k = start + j/R + k·C/R`: evenly spaced sends overall, with no
//! drift, whatever the responses do. If a response arrives after the next
//! slot, the next request is sent at once and its latency is measured from
//! its *intended* send time `t_k`, so time spent queued behind a slow
//! response is counted (the correction wrk2 introduced). If the connection
//! was idle and had to sleep until `t_k`, the clock starts when the timer
//! actually fired: tokio's timer has 1 ms granularity, and charging its
//! slack to the target would swamp sub-millisecond latencies. That slack is
//! reported separately (`sched_lag_*`) so a generator that cannot keep its
//! own schedule is visible.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use tokio::task::LocalSet;

use crate::cpu;
use crate::progress::ProgressLine;
use crate::stats::{Counters, ErrorKind, Recorder};

/// Back-off after a failed connect in closed loop, so a dead target is not
/// hammered in a tight loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(20);

/// One protocol's client side: how to open a connection and make a request.
///
/// Implementations hold the target (address, request template) and are shared
/// by all worker threads; a [`Client::Conn`] lives on one thread only.
pub trait Client: Send + Sync + 'static {
    /// One open connection (or stream) that carries one request at a time.
    type Conn: 'static;

    /// Opens a connection, including any protocol handshake.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, ErrorKind>>;

    /// Makes one request on `conn` and reads the whole response.
    fn call(&self, conn: &mut Self::Conn) -> impl Future<Output = Result<(), ErrorKind>>;
}

/// When the measurement window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long (requests already in flight are completed and counted).
    Duration(Duration),
    /// After this many requests in total, successful or not.
    Requests(u64),
}

/// How to drive the load.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Concurrent connections, each with one request in flight at a time.
    pub connections: usize,
    /// Total requests per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Unrecorded time before the measurement window.
    pub warmup: Duration,
    /// End of the measurement window.
    pub stop: Stop,
    /// Per-request timeout (also bounds each connect).
    pub timeout: Duration,
    /// Worker threads (capped at `connections`).
    pub threads: usize,
    /// CPUs to pin worker thread `i` to (`cpus[i % len]`); empty: no pinning.
    pub cpus: Vec<usize>,
    /// Print a progress line on stderr once per second.
    pub progress: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            connections: 1,
            rate: None,
            warmup: Duration::ZERO,
            stop: Stop::Duration(Duration::from_secs(10)),
            timeout: Duration::from_secs(10),
            threads: 1,
            cpus: Vec::new(),
            progress: false,
        }
    }
}

/// A configuration the engine cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Zero connections, a non-positive rate, and the like.
    #[error("invalid load configuration: {0}")]
    Config(&'static str),
    /// A worker thread or its runtime could not be created.
    #[error("cannot start worker thread: {0}")]
    Thread(#[from] std::io::Error),
    /// Pinning failed.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// A worker thread panicked.
    #[error("a worker thread panicked")]
    Panicked,
}

/// The result of a run: the merged recorders and the measured window.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Everything recorded in the measurement window.
    pub recorder: Recorder,
    /// From the start of the measurement window to the last completion in it.
    pub elapsed: Duration,
    /// Worker threads actually used.
    pub threads: usize,
}

impl Measurement {
    /// Successful requests per second over the measurement window.
    pub fn rps(&self) -> f64 {
        per_second(self.recorder.ok, self.elapsed)
    }
}

/// `count / elapsed`, or 0 for an empty window.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// Checks a configuration and returns the number of threads to use.
fn validate(cfg: &LoadConfig) -> Result<usize, LoadError> {
    if cfg.connections == 0 {
        return Err(LoadError::Config("connections must be at least 1"));
    }
    if cfg
        .rate
        .is_some_and(|rate| !(rate.is_finite() && rate > 0.0))
    {
        return Err(LoadError::Config("rate must be a positive number"));
    }
    if cfg.stop == Stop::Requests(0) {
        return Err(LoadError::Config("requests must be at least 1"));
    }
    if cfg.timeout.is_zero() {
        return Err(LoadError::Config("timeout must be positive"));
    }
    Ok(cfg.threads.clamp(1, cfg.connections))
}

/// What one connection must do, fixed before the run starts.
#[derive(Debug, Clone, Copy)]
struct Plan {
    start: Instant,
    measure_start: Instant,
    /// Duration mode: no request is started at or after this instant.
    end: Option<Instant>,
    /// Requests mode: this connection's share of measured requests.
    budget: Option<u64>,
    /// Open loop: first send time and interval of this connection's schedule.
    schedule: Option<(Instant, Duration)>,
    timeout: Duration,
}

/// What one connection hands back.
#[derive(Debug, Default, Clone, Copy)]
struct LaneEnd {
    /// Last completion of a measured request.
    last_done: Option<Instant>,
}

/// Runs `client` with `cfg` on fresh worker threads and blocks until done.
pub fn run<C: Client>(client: Arc<C>, cfg: &LoadConfig) -> Result<Measurement, LoadError> {
    let threads = validate(cfg)?;
    let barrier = Arc::new(Barrier::new(threads + 1));
    let ready: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let counters: Vec<Arc<Counters>> = (0..threads).map(|_| Arc::default()).collect();

    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let client = Arc::clone(&client);
        let cfg = cfg.clone();
        let barrier = Arc::clone(&barrier);
        let ready = Arc::clone(&ready);
        let counters = Arc::clone(&counters[t]);
        let handle = std::thread::Builder::new()
            .name(format!("weft-bench-{t}"))
            .spawn(move || worker(t, threads, client, cfg, barrier, ready, counters))?;
        handles.push(handle);
    }

    // All threads have connected once the barrier opens.
    barrier.wait();
    let progress = cfg.progress.then(|| {
        let start = Instant::now();
        ProgressLine::start(counters.clone(), start + cfg.warmup)
    });

    let mut recorder = Recorder::default();
    let mut last_done: Option<Instant> = None;
    let mut measure_start: Option<Instant> = None;
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(out)) => {
                recorder.merge(&out.recorder);
                last_done = last_done.max(out.last_done);
                measure_start = Some(out.measure_start);
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(LoadError::Panicked),
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = match (measure_start, last_done) {
        (Some(s), Some(d)) => d.saturating_duration_since(s),
        _ => Duration::ZERO,
    };
    Ok(Measurement {
        recorder,
        elapsed,
        threads,
    })
}

/// What one worker thread hands back.
struct WorkerOut {
    recorder: Recorder,
    last_done: Option<Instant>,
    measure_start: Instant,
}

fn worker<C: Client>(
    t: usize,
    threads: usize,
    client: Arc<C>,
    cfg: LoadConfig,
    barrier: Arc<Barrier>,
    ready: Arc<Mutex<Option<Instant>>>,
    counters: Arc<Counters>,
) -> Result<WorkerOut, LoadError> {
    // Whatever happens, reach the barrier, or the other threads wait forever.
    let setup = (|| {
        if !cfg.cpus.is_empty() {
            cpu::pin_current_thread(cfg.cpus[t % cfg.cpus.len()])?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok::<_, LoadError>(rt)
    })();
    let lanes: Vec<usize> = (t..cfg.connections).step_by(threads).collect();
    let local = LocalSet::new();
    let conns = match &setup {
        Ok(rt) => local.block_on(rt, connect_all(&client, lanes.len(), cfg.timeout)),
        Err(_) => Vec::new(),
    };
    {
        let now = Instant::now();
        let mut r = ready.lock().unwrap_or_else(|p| p.into_inner());
        *r = (*r).max(Some(now));
    }
    barrier.wait();
    let rt = setup?;
    // Every thread set `ready` before the barrier, so all read the same value.
    let start = ready
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or_else(Instant::now);
    let measure_start = start + cfg.warmup;
    let end = match cfg.stop {
        Stop::Duration(d) => Some(measure_start + d),
        Stop::Requests(_) => None,
    };

    let recorder = Rc::new(RefCell::new(Recorder::default()));
    let last_done = local.block_on(&rt, async {
        let mut tasks = Vec::with_capacity(lanes.len());
        for (&j, conn) in lanes.iter().zip(conns) {
            let plan = Plan {
                start,
                measure_start,
                end,
                budget: match cfg.stop {
                    Stop::Requests(n) => Some(share(n, cfg.connections, j)),
                    Stop::Duration(_) => None,
                },
                schedule: cfg.rate.map(|rate| {
                    let first = start + Duration::from_secs_f64(j as f64 / rate);
                    (
                        first,
                        Duration::from_secs_f64(cfg.connections as f64 / rate),
                    )
                }),
                timeout: cfg.timeout,
            };
            let lane = lane(
                Arc::clone(&client),
                conn,
                plan,
                Rc::clone(&recorder),
                Arc::clone(&counters),
            );
            tasks.push(tokio::task::spawn_local(lane));
        }
        let mut last: Option<Instant> = None;
        for task in tasks {
            if let Ok(end) = task.await {
                last = last.max(end.last_done);
            }
        }
        last
    });
    // Close connections before the runtime goes away.
    drop(local);
    let recorder = Rc::try_unwrap(recorder)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow().clone());
    Ok(WorkerOut {
        recorder,
        last_done,
        measure_start,
    })
}

/// Connection `j`'s share of `total` requests over `n` connections.
fn share(total: u64, n: usize, j: usize) -> u64 {
    let n = n as u64;
    let j = j as u64;
    total / n + u64::from(j < total % n)
}

/// Opens `n` connections concurrently; failures become `None` and are retried
/// by the lane.
async fn connect_all<C: Client>(
    client: &Arc<C>,
    n: usize,
    timeout: Duration,
) -> Vec<Option<C::Conn>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = Arc::clone(client);
            tokio::task::spawn_local(async move {
                tokio::time::timeout(timeout, client.connect())
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(n);
    for task in tasks {
        conns.push(task.await.ok().flatten());
    }
    conns
}

/// One connection's loop.
async fn lane<C: Client>(
    client: Arc<C>,
    mut conn: Option<C::Conn>,
    plan: Plan,
    recorder: Rc<RefCell<Recorder>>,
    counters: Arc<Counters>,
) -> LaneEnd {
    let mut out = LaneEnd::default();
    let mut measured: u64 = 0;
    let mut slot: u32 = 0;
    if plan.schedule.is_none() {
        tokio::time::sleep_until(plan.start.into()).await;
    }
    loop {
        if plan.budget.is_some_and(|b| measured >= b) {
            break;
        }
        // When this request should go out, and when its clock starts.
        let (intended, clock) = match plan.schedule {
            Some((first, interval)) => {
                let intended = first + interval * slot;
                slot = slot.saturating_add(1);
                if plan.end.is_some_and(|end| intended >= end) {
                    break;
                }
                if Instant::now() < intended {
                    tokio::time::sleep_until(intended.into()).await;
                    let woke = Instant::now();
                    if intended >= plan.measure_start {
                        recorder
                            .borrow_mut()
                            .record_lag(woke.saturating_duration_since(intended));
                    }
                    (intended, woke)
                } else {
                    // Behind schedule: count the queueing from the intended time.
                    (intended, intended)
                }
            }
            None => {
                let now = Instant::now();
                if plan.end.is_some_and(|end| now >= end) {
                    break;
                }
                (now, now)
            }
        };
        let in_window = intended >= plan.measure_start;

        let result = match conn.as_mut() {
            Some(c) => match tokio::time::timeout(plan.timeout, client.call(c)).await {
                Ok(r) => r,
                Err(_) => Err(ErrorKind::Timeout),
            },
            None => match tokio::time::timeout(plan.timeout, client.connect()).await {
                Ok(Ok(mut c)) => {
                    let r = match tokio::time::timeout(plan.timeout, client.call(&mut c)).await {
                        Ok(r) => r,
                        Err(_) => Err(ErrorKind::Timeout),
                    };
                    conn = Some(c);
                    r
                }
                Ok(Err(kind)) => Err(kind),
                Err(_) => Err(ErrorKind::Connect),
            },
        };
        let done = Instant::now();
        let latency = done.saturating_duration_since(clock);
        counters.request(latency, result.is_err());
        if in_window {
            measured += 1;
            out.last_done = Some(done);
        }
        match result {
            Ok(()) => {
                if in_window {
                    recorder.borrow_mut().record_ok(latency);
                }
            }
            Err(kind) => {
                if in_window {
                    recorder.borrow_mut().errors.add(kind);
                }
                if !kind.keeps_connection() {
                    conn = None;
                }
                if kind == ErrorKind::Connect && plan.schedule.is_none() {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, n) in [(10u64, 3usize), (1, 4), (1000, 7), (5, 5)] {
            let sum: u64 = (0..n).map(|j| share(total, n, j)).sum();
            assert_eq!(sum, total);
        }
    }

    #[test]
    fn rejects_bad_config() {
        let bad = [
            LoadConfig {
                connections: 0,
                ..LoadConfig::default()
            },
            LoadConfig {
                rate: Some(0.0),
                ..LoadConfig::default()
            },
            LoadConfig {
                rate: Some(f64::NAN),
                ..LoadConfig::default()
            },
            LoadConfig {
                stop: Stop::Requests(0),
                ..LoadConfig::default()
            },
        ];
        for cfg in bad {
            assert!(validate(&cfg).is_err(), "{cfg:?}");
        }
    }

    /// A client whose requests take no time and never fail.
    struct Instant0;
    impl Client for Instant0 {
        type Conn = ();
        async fn connect(&self) -> Result<(), ErrorKind> {
            Ok(())
        }
        async fn call(&self, _: &mut ()) -> Result<(), ErrorKind> {
            Ok(())
        }
    }

    #[test]
    fn request_count_is_exact() {
        let cfg = LoadConfig {
            connections: 3,
            threads: 2,
            stop: Stop::Requests(100),
            ..LoadConfig::default()
        };
        let m = run(Arc::new(Instant0), &cfg).unwrap();
        assert_eq!(m.recorder.ok, 100);
        assert_eq!(m.recorder.errors.total(), 0);
    }

    #[test]
    fn open_loop_sends_on_schedule() {
        let cfg = LoadConfig {
            connections: 4,
            threads: 2,
            rate: Some(1000.0),
            stop: Stop::Duration(Duration::from_millis(200)),
            ..LoadConfig::default()
        };
        let m = run(Arc::new(Instant0), &cfg).unwrap();
        // 200 slots in [0, 200 ms), whatever the timer does.
        assert_eq!(m.recorder.ok, 200);
    }
}
