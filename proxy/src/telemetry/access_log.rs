//! Access logs: one JSON line per HTTP request or opaque TCP connection, to the mesh's logging
//! backend (`file`: appended to a path; `tcp`: sent to `host:port`).
//!
//! The request path only builds an [`AccessLogEntry`] and `try_send`s it into a bounded
//! queue; a writer task serializes and writes. A full queue drops the line and counts it
//! (`weft_access_log_lines_dropped_total{reason="queue_full"}`); a line the writer cannot
//! write is dropped and counted too (`reason="write_failed"`), and so is a line sent after
//! the writer stopped (`reason="closed"`). The TCP writer reconnects with
//! capped backoff; the file writer reopens the file after a failure (so rotation by rename
//! works once a write fails, and a missing directory is retried).
//!
//! A line (fields in this order; absent ones are omitted):
//! ```json
//! {"start_time":"2026-11-27T10:00:00.123456Z","duration_ms":12.345,"direction":"outbound",
//!  "protocol":"http","mesh":"default","source_service":"web","destination_service":"backend",
//!  "method":"GET","path":"/api","status":200,"bytes_sent":10,"bytes_received":2048,
//!  "trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","peer_address":"10.0.0.7:8080","error":"…"}
//! ```
//! `bytes_sent` flows from the downstream (the caller) to the upstream, `bytes_received` back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Serialize, Serializer};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use weft_api::proto::LoggingBackend;

use super::trace::ReasonLabel;
use super::{TelemetryError, TelemetryOptions};

/// One access-log line.
#[derive(Debug, Clone, Serialize)]
pub struct AccessLogEntry {
    /// When the request or connection started (RFC 3339, UTC, microseconds).
    #[serde(serialize_with = "rfc3339")]
    pub start_time: SystemTime,
    /// How long it lasted, in milliseconds (microsecond precision).
    #[serde(serialize_with = "millis")]
    pub duration_ms: Duration,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// `http` or `tcp`.
    pub protocol: &'static str,
    /// The mesh.
    #[serde(serialize_with = "text")]
    pub mesh: Arc<str>,
    /// The calling service, when known.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_text")]
    pub source_service: Option<Arc<str>>,
    /// The called service, when known.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_text")]
    pub destination_service: Option<Arc<str>>,
    /// HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP path (without the query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP response status; absent when none was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Bytes from the downstream to the upstream.
    pub bytes_sent: u64,
    /// Bytes from the upstream to the downstream.
    pub bytes_received: u64,
    /// The trace this request belongs to (32 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The other side's address, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<SocketAddr>,
    /// Why the exchange failed, for transport failures and aborts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn text<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn opt_text<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(v),
        None => s.serialize_none(),
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    // Microsecond precision: the nearest double to micros/1000 prints as its decimal.
    s.serialize_f64(d.as_micros() as f64 / 1000.0)
}

impl AccessLogEntry {
    /// The JSON line, newline-terminated.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// Counters of the access log. Clones share the series.
#[derive(Clone, Debug)]
pub struct AccessLogMetrics {
    /// `weft_access_log_lines_written_total`.
    pub written: Counter,
    /// `weft_access_log_lines_dropped_total{reason}`.
    pub dropped: Family<ReasonLabel, Counter>,
    queue_full: Counter,
    write_failed: Counter,
    closed: Counter,
}

impl Default for AccessLogMetrics {
    fn default() -> Self {
        let dropped = Family::<ReasonLabel, Counter>::default();
        let get = |reason| dropped.get_or_create(&ReasonLabel { reason }).clone();
        let (queue_full, write_failed, closed) =
            (get("queue_full"), get("write_failed"), get("closed"));
        Self {
            written: Counter::default(),
            dropped,
            queue_full,
            write_failed,
            closed,
        }
    }
}

impl AccessLogMetrics {
    /// Registers the counters (full names).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_access_log_lines_written",
            "Access-log lines written to the mesh's logging backend",
            self.written.clone(),
        );
        registry.register(
            "weft_access_log_lines_dropped",
            "Access-log lines not written: the queue was full, or the backend failed",
            self.dropped.clone(),
        );
    }

    /// Lines dropped because the queue was full.
    pub fn dropped_queue_full(&self) -> u64 {
        self.queue_full.get()
    }

    /// Lines dropped because writing failed.
    pub fn dropped_write_failed(&self) -> u64 {
        self.write_failed.get()
    }
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Append to this file.
    File(std::path::PathBuf),
    /// Send to this `host:port`.
    Tcp(String),
}

impl Destination {
    /// Reads a snapshot's logging backend.
    pub fn from_backend(b: &LoggingBackend) -> Result<Self, TelemetryError> {
        let bad = |reason: String| TelemetryError::Backend {
            backend: "logging",
            reason,
        };
        if b.destination.trim().is_empty() {
            return Err(bad(format!(
                "{} backend has no destination",
                b.backend_type
            )));
        }
        match b.backend_type.as_str() {
            "file" => Ok(Destination::File(b.destination.clone().into())),
            "tcp" => match b.destination.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Destination::Tcp(b.destination.clone()))
                }
                _ => Err(bad(format!("{:?} is not host:port", b.destination))),
            },
            other => Err(bad(format!("unknown backend type {other:?}"))),
        }
    }
}

/// The request path's end of the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<AccessLogEntry>,
    metrics: AccessLogMetrics,
    destination: Destination,
}

impl AccessLog {
    /// Starts a writer task for `destination`; needs a tokio runtime. The task ends once every
    /// clone of the returned value is dropped and the queue is written out.
    pub fn start(
        destination: Destination,
        options: &TelemetryOptions,
        metrics: &AccessLogMetrics,
    ) -> Result<Self, TelemetryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let (tx, rx) = mpsc::channel(options.log_queue.max(1));
        runtime.spawn(write_loop(destination.clone(), rx, metrics.clone()));
        Ok(Self {
            tx,
            metrics: metrics.clone(),
            destination,
        })
    }

    /// Where this log writes.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// Queues one line; drops and counts it when the queue is full.
    pub fn send(&self, entry: AccessLogEntry) {
        let counter = match self.tx.try_send(entry) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => &self.metrics.queue_full,
            // The task is gone (the runtime is shutting down).
            Err(mpsc::error::TrySendError::Closed(_)) => &self.metrics.closed,
        };
        counter.inc();
    }
}

/// An open sink.
enum Sink {
    File(tokio::fs::File),
    Tcp(tokio::net::TcpStream),
}

const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

async fn open(dest: &Destination) -> std::io::Result<Sink> {
    match dest {
        Destination::File(p) => {
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .await?;
            Ok(Sink::File(f))
        }
        Destination::Tcp(addr) => {
            let s = tokio::time::timeout(WRITE_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let _ = s.set_nodelay(true);
            Ok(Sink::Tcp(s))
        }
    }
}

async fn write(sink: &mut Sink, bytes: &[u8]) -> std::io::Result<()> {
    let fut = async {
        match sink {
            Sink::File(f) => {
                f.write_all(bytes).await?;
                f.flush().await
            }
            Sink::Tcp(s) => s.write_all(bytes).await,
        }
    };
    tokio::time::timeout(WRITE_TIMEOUT, fut)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Writes queued lines in batches (one write per batch) until the queue is closed.
async fn write_loop(
    dest: Destination,
    mut rx: mpsc::Receiver<AccessLogEntry>,
    metrics: AccessLogMetrics,
) {
    let mut sink: Option<Sink> = None;
    let mut backoff = Duration::from_millis(100);
    let mut entries = Vec::with_capacity(64);
    let mut buf = String::new();
    loop {
        if entries.is_empty() && rx.recv_many(&mut entries, 64).await == 0 {
            break;
        }
        buf.clear();
        for e in &entries {
            buf.push_str(&e.to_line());
        }
        if sink.is_none() {
            match open(&dest).await {
                Ok(s) => {
                    sink = Some(s);
                    backoff = Duration::from_millis(100);
                }
                Err(e) if rx.is_closed() => {
                    // This backend was replaced or the proxy is stopping: give up on it.
                    let mut lost = entries.len() as u64;
                    while rx.try_recv().is_ok() {
                        lost += 1;
                    }
                    tracing::warn!(destination = ?dest, error = %e, lines = lost,
                        "access log backend unavailable; its last lines are dropped");
                    metrics.write_failed.inc_by(lost);
                    break;
                }
                Err(e) => {
                    tracing::warn!(destination = ?dest, error = %e, retry_in = ?backoff,
                        "access log backend unavailable");
                    // Lines keep queueing (and dropping when full) while we wait; the ones
                    // in hand are kept for the next attempt.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(s) = sink.as_mut() else { continue };
        match write(s, buf.as_bytes()).await {
            Ok(()) => {
                metrics.written.inc_by(entries.len() as u64);
            }
            Err(e) => {
                tracing::warn!(destination = ?dest, error = %e, lines = entries.len(),
                    "access log write failed; lines dropped, reconnecting");
                metrics.write_failed.inc_by(entries.len() as u64);
                sink = None;
            }
        }
        entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> AccessLogEntry {
        AccessLogEntry {
            start_time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456),
            duration_ms: Duration::from_micros(12_345),
            direction: "outbound",
            protocol: "http",
            mesh: "default".into(),
            source_service: Some("web".into()),
            destination_service: Some("backend".into()),
            method: Some("GET".into()),
            path: Some("/api".into()),
            status: Some(200),
            bytes_sent: 10,
            bytes_received: 2048,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            peer_address: None,
            error: None,
        }
    }

    #[test]
    fn line_format() {
        assert_eq!(
            entry().to_line(),
            concat!(
                r#"{"start_time":"2026-11-18T11:06:40.123456Z","duration_ms":12.345,"#,
                r#""direction":"outbound","protocol":"http","mesh":"default","#,
                r#""source_service":"web","destination_service":"backend","method":"GET","#,
                r#""path":"/api","status":200,"bytes_sent":10,"bytes_received":2048,"#,
                r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#,
                "\n"
            )
        );
        let tcp = AccessLogEntry {
            protocol: "tcp",
            method: None,
            path: None,
            status: None,
            trace_id: None,
            source_service: None,
            error: Some("reset".into()),
            ..entry()
        };
        let v: serde_json::Value = serde_json::from_str(&tcp.to_line()).expect("json");
        assert_eq!(v["protocol"], "tcp");
        assert!(v.get("method").is_none() && v.get("source_service").is_none());
        assert_eq!(v["error"], "reset");
    }

    #[test]
    fn destinations_are_checked() {
        let b = |t: &str, d: &str| LoggingBackend {
            enabled: true,
            name: "l".into(),
            backend_type: t.into(),
            destination: d.into(),
        };
        assert!(Destination::from_backend(&b("file", "/tmp/a.log")).is_ok());
        assert!(Destination::from_backend(&b("tcp", "logstash:5000")).is_ok());
        assert!(Destination::from_backend(&b("tcp", "logstash")).is_err());
        assert!(Destination::from_backend(&b("file", "")).is_err());
        assert!(Destination::from_backend(&b("syslog", "x")).is_err());
    }

    #[tokio::test]
    async fn a_dropped_log_with_a_dead_backend_gives_up_and_counts() {
        let metrics = AccessLogMetrics::default();
        let dest = Destination::File("/nonexistent-dir/weft/access.log".into());
        let log = AccessLog::start(dest, &TelemetryOptions::default(), &metrics).expect("start");
        for _ in 0..3 {
            log.send(entry());
        }
        // Replaced by a new backend: the writer must not retry forever.
        drop(log);
        tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.dropped_write_failed() < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the writer gave up and counted the lines");
        assert_eq!(metrics.written.get(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_tcp_reconnects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = AccessLogMetrics::default();
        let options = TelemetryOptions {
            log_queue: 8,
            ..TelemetryOptions::default()
        };
        let log = AccessLog::start(Destination::Tcp(addr.to_string()), &options, &metrics)
            .expect("start");
        // The writer task has not run yet (current-thread runtime): 8 fit, 12 drop.
        for _ in 0..20 {
            log.send(entry());
        }
        assert_eq!(metrics.dropped_queue_full(), 12);

        // The first connection gets the 8 queued lines; then it is closed under the writer.
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut got = Vec::new();
        while got.iter().filter(|b| **b == b'\n').count() < 8 {
            let mut buf = [0u8; 4096];
            let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
                .await
                .expect("read");
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        drop(conn);
        // Writes fail (and are counted) until the writer notices and reconnects.
        let mut conn = loop {
            log.send(entry());
            tokio::select! {
                a = listener.accept() => break a.expect("accept").0,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        log.send(entry());
        let mut buf = [0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
            .await
            .expect("read");
        assert!(n > 0);
        assert!(
            std::str::from_utf8(&buf[..n])
                .expect("utf8")
                .contains("\"status\":200")
        );
        assert!(metrics.written.get() >= 8);
    }
}
