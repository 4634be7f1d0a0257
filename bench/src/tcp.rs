//! Raw TCP: ping-pong latency through the request engine, and echo
//! throughput (stream mode) with its own small runner.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cpu;
use crate::load::{LoadError, Measurement};
use crate::progress::ProgressLine;
use crate::stats::{Counters, ErrorKind, Recorder};
use crate::target;

/// Ping-pong: write `size` bytes, read `size` bytes back; one round trip is
/// one request.
#[derive(Debug, Clone)]
pub struct PingPongClient {
    addr: SocketAddr,
    message: Vec<u8>,
}

impl PingPongClient {
    /// Targets an echo server at `addr` with `size`-byte messages (at least 1).
    pub fn new(addr: SocketAddr, size: usize) -> PingPongClient {
        PingPongClient {
            addr,
            message: vec![b'x'; size.max(1)],
        }
    }
}

/// An open ping-pong connection and its receive buffer.
#[derive(Debug)]
pub struct PingPongConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::InvalidData => ErrorKind::Protocol,
        _ => ErrorKind::Io,
    }
}

impl crate::load::Client for PingPongClient {
    type Conn = PingPongConn;

    async fn connect(&self) -> Result<PingPongConn, ErrorKind> {
        let stream = target::connect_tcp(self.addr).await?;
        Ok(PingPongConn {
            stream,
            buf: vec![0; self.message.len()],
        })
    }

    async fn call(&self, conn: &mut PingPongConn) -> Result<(), ErrorKind> {
        conn.stream
            .write_all(&self.message)
            .await
            .map_err(|e| io_kind(&e))?;
        conn.stream
            .read_exact(&mut conn.buf)
            .await
            .map_err(|e| io_kind(&e))?;
        Ok(())
    }
}

/// How to run a stream (throughput) test.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Echo server address.
    pub addr: SocketAddr,
    /// Parallel connections.
    pub connections: usize,
    /// Bytes per write.
    pub chunk: usize,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Runtime worker threads.
    pub threads: usize,
    /// CPUs to pin runtime threads to; empty: no pinning.
    pub cpus: Vec<usize>,
    /// Live progress line on stderr.
    pub progress: bool,
}

/// Streams data through an echo server on every connection at full speed
/// and counts the bytes that come back during the measurement window. The
/// result's `recorder.bytes` holds them; it records no latencies.
pub fn stream(cfg: &StreamConfig) -> Result<Measurement, LoadError> {
    if cfg.connections == 0 || cfg.chunk == 0 {
        return Err(LoadError::Config("connections and size must be at least 1"));
    }
    let threads = cfg.threads.max(1);
    let cpus = cfg.cpus.clone();
    let next = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .on_thread_start(move || {
            if !cpus.is_empty() {
                let i = next.fetch_add(1, Relaxed);
                // Best effort: a failed pin leaves the thread unpinned.
                let _ = cpu::pin_current_thread(cpus[i % cpus.len()]);
            }
        })
        .build()?;
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let end = measure_start + cfg.duration;
    let progress = cfg
        .progress
        .then(|| ProgressLine::start(vec![Arc::clone(&counters)], measure_start));
    let recorder = rt.block_on(async {
        let mut tasks = Vec::with_capacity(cfg.connections);
        for _ in 0..cfg.connections {
            let counters = Arc::clone(&counters);
            let (addr, chunk) = (cfg.addr, cfg.chunk);
            tasks.push(tokio::spawn(async move {
                stream_one(addr, chunk, measure_start, end, &counters).await
            }));
        }
        let mut recorder = Recorder::default();
        for task in tasks {
            match task.await {
                Ok(Ok(bytes)) => recorder.bytes += bytes,
                Ok(Err(kind)) => recorder.errors.add(kind),
                Err(_) => recorder.errors.add(ErrorKind::Io),
            }
        }
        recorder
    });
    if let Some(p) = progress {
        p.finish();
    }
    Ok(Measurement {
        recorder,
        elapsed: cfg.duration,
        threads,
    })
}

/// One connection of a stream test; returns the bytes echoed back in the
/// measurement window.
async fn stream_one(
    addr: SocketAddr,
    chunk: usize,
    measure_start: Instant,
    end: Instant,
    counters: &Counters,
) -> Result<u64, ErrorKind> {
    let stream = target::connect_tcp(addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = async move {
        let buf = vec![b'x'; chunk];
        // The reader stops at `end`, after which the echo backs up and a
        // write may block: stop waiting at `end` too.
        loop {
            tokio::select! {
                r = wr.write_all(&buf) => r.map_err(|e| io_kind(&e))?,
                () = tokio::time::sleep_until(end.into()) => break,
            }
        }
        Ok::<_, ErrorKind>(wr)
    };
    let reader = async move {
        let mut buf = vec![0u8; chunk.max(64 * 1024)];
        let mut measured = 0u64;
        loop {
            let n = tokio::select! {
                r = rd.read(&mut buf) => r.map_err(|e| io_kind(&e))?,
                () = tokio::time::sleep_until(end.into()) => break,
            };
            if n == 0 {
                return Err(ErrorKind::Io);
            }
            let now = Instant::now();
            if now >= end {
                break;
            }
            counters.bytes.fetch_add(n as u64, Relaxed);
            if now >= measure_start {
                measured += n as u64;
            }
        }
        Ok(measured)
    };
    let (w, r) = tokio::join!(writer, reader);
    w?;
    r
}
