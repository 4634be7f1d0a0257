//! A real Prometheus server (Debian package `prometheus`) scrapes the telemetry's mesh
//! endpoint on loopback every second, and its PromQL API must count exactly the requests
//! recorded. Skipped, with a message, only when the `prometheus` binary is absent.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_api::proto::MetricsBackend;
use weft_proxy::metrics::Metrics;
use weft_proxy::telemetry::prom_server::PromServer;
use weft_proxy::telemetry::{Direction, Telemetry, TelemetrySettings};

fn prometheus_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

/// Kills and reaps the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on 127.0.0.1:port; the body, or `None` when not answered with 200.
async fn get(port: u16, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// `sum(weft_requests_total)` from the PromQL API, once Prometheus has a sample.
async fn query_sum(port: u16) -> Option<f64> {
    let body = get(port, "/api/v1/query?query=sum%28weft_requests_total%29").await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_mesh_endpoint() {
    let Some(binary) = prometheus_binary() else {
        eprintln!("SKIPPED: no `prometheus` binary on PATH (apt-get install prometheus)");
        return;
    };
    let telemetry = Telemetry::new();
    let metrics = std::sync::Arc::new(Metrics::with_extra(|r| telemetry.register(r)));
    let server = {
        let m = metrics.clone();
        PromServer::new(move || m.encode())
    };
    let scrape_port = support::free_port();
    server
        .apply(Some(&MetricsBackend {
            enabled: true,
            name: "prometheus-1".into(),
            port: u32::from(scrape_port),
            path: "/metrics".into(),
            skip_mtls: true,
        }))
        .expect("mesh endpoint");
    telemetry
        .apply(&TelemetrySettings {
            mesh: "default".into(),
            service: "web".into(),
            services: vec!["backend".into(), "web".into()],
            tracing: None,
            logging: None,
        })
        .expect("apply");

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: weft\n    metrics_path: /metrics\n\
             \x20   static_configs:\n      - targets: ['127.0.0.1:{scrape_port}']\n"
        ),
    )
    .expect("config");
    let web_port = support::free_port();
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let child = Command::new(&binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start prometheus");
    let _server = Server(child);

    // N observations over several series: services, directions, codes, one transport error.
    let uri = Uri::from_static("/api");
    let mut h = HeaderMap::new();
    let mut n = 0;
    for (direction, service, code) in [
        (Direction::Outbound, "backend", Some(200)),
        (Direction::Outbound, "backend", Some(200)),
        (Direction::Outbound, "backend", Some(404)),
        (Direction::Inbound, "web", Some(200)),
        (Direction::Inbound, "web", Some(500)),
        (Direction::Outbound, "backend", None),
        (Direction::Outbound, "elsewhere", Some(200)),
    ] {
        let mut o = telemetry.begin(direction, service, None, &Method::GET, &uri, &mut h);
        match code {
            Some(c) => {
                o.status(c);
                o.finish(1, 1, None);
            }
            None => o.finish(0, 0, Some("connection refused")),
        }
        n += 1;
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        last = query_sum(web_port).await;
        if last == Some(f64::from(n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        last,
        Some(f64::from(n)),
        "Prometheus never saw sum(weft_requests_total) = {n}; its log:\n{}",
        log_tail(&log)
    );
    // And the histogram and process metrics made it through the OpenMetrics parser.
    let count = get(
        web_port,
        "/api/v1/query?query=sum%28weft_request_duration_seconds_count%29",
    )
    .await
    .unwrap_or_default();
    assert!(count.contains(&format!("\"{n}\"")), "{count}");
    let fds = get(web_port, "/api/v1/query?query=process_open_fds")
        .await
        .unwrap_or_default();
    assert!(fds.contains("\"result\":[{"), "{fds}");
}
