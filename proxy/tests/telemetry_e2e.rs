//! The running proxy's telemetry wiring end to end (`weft-proxy run`, the real control plane,
//! namespaces; root only, skipped visibly otherwise): the mesh's Prometheus endpoint appears
//! on the sidecar's host when the Mesh enables a metrics backend, moves when the backend's
//! port and path change, and closes when it is removed — scraped from another host of the
//! LAN, as the mesh's Prometheus would.

#[macro_use]
#[allow(unused_imports)] // the harness re-exports helpers this test does not need
mod e2e;

use e2e::{
    App, ControlPlane, Sidecar, ThreeHosts, WAIT, http_get, mesh_yaml, permission_yaml, wait_for,
};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use weft_tests::Host;

const APP_PORT: u16 = 8080;

fn mesh(metrics: Option<(u16, &str)>) -> String {
    let mut yaml = mesh_yaml("alpha", true, "24h");
    if let Some((port, path)) = metrics {
        yaml.push_str(&format!(
            "metrics:\n  enabledBackend: prom-1\n  backends:\n    - name: prom-1\n      \
             type: prometheus\n      conf:\n        port: {port}\n        path: {path}\n"
        ));
    }
    yaml
}

/// Whether `GET path` on `to` from `from` answers 200; the body when it does.
fn scrape(from: &Host, to: SocketAddr, path: &str) -> Option<String> {
    match http_get(from, to, path) {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

#[test]
fn the_mesh_prometheus_endpoint_follows_the_mesh() {
    let env = env_or_skip!("the_mesh_prometheus_endpoint_follows_the_mesh");
    let (cp_host, server_host) = (env.host("cp"), env.host("server"));
    let _lan = env.net.lan(&[&cp_host, &server_host]).expect("a LAN");
    let cp = ControlPlane::start(&env, &cp_host);
    cp.apply(env.dir(), &mesh(Some((5670, "/metrics"))));
    let _app = App::start(&server_host, APP_PORT, "server");
    let _server = Sidecar::start(
        &env,
        &cp,
        &server_host,
        "alpha",
        "server",
        "server",
        APP_PORT,
    );
    let at = |port: u16| SocketAddr::from((server_host.ip(), port));

    wait_for("the mesh endpoint on :5670/metrics", WAIT, || {
        scrape(&cp_host, at(5670), "/metrics").is_some()
    });
    let body = scrape(&cp_host, at(5670), "/metrics").expect("scrape");
    for series in [
        "weft_control_plane_connected 1",
        "weft_config_updates_total{result=\"ack\"} 1",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(body.contains(series), "missing {series:?} in\n{body}");
    }

    cp.apply(env.dir(), &mesh(Some((5671, "/stats"))));
    wait_for("the endpoint to move to :5671/stats", WAIT, || {
        scrape(&cp_host, at(5671), "/stats").is_some()
    });
    assert!(
        scrape(&cp_host, at(5670), "/metrics").is_none(),
        "the old port still serves"
    );

    cp.apply(env.dir(), &mesh(None));
    wait_for("the endpoint to close", WAIT, || {
        scrape(&cp_host, at(5671), "/stats").is_none()
    });
}

/// Kills and reaps Prometheus when the test ends, however it ends.
struct Prometheus(Option<weft_tests::Proc>);

impl Drop for Prometheus {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

fn prometheus_binary() -> Option<std::path::PathBuf> {
    ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

/// The value of a PromQL query (a single-sample vector), asked from `host`.
fn promql(host: &Host, query: &str) -> Option<f64> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(
        host,
        SocketAddr::from(([127, 0, 0, 1], 9090)),
        &format!("/api/v1/query?query={encoded}"),
    )
    .ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_counts_the_requests_through_both_sidecars() {
    let env = env_or_skip!("a_real_prometheus_counts_the_requests_through_both_sidecars");
    let Some(prometheus) = prometheus_binary() else {
        eprintln!("SKIPPED: no prometheus binary (apt-get install prometheus)");
        return;
    };
    let hosts = ThreeHosts::new(&env);
    let (cp_host, client_host, server_host) = (&hosts.cp, &hosts.client, &hosts.server);
    let cp = ControlPlane::start(&env, cp_host);
    cp.apply(
        env.dir(),
        &format!(
            "{}---\n{}",
            mesh(Some((5670, "/metrics"))),
            permission_yaml("alpha", "client-to-server", "client", "server")
        ),
    );
    let _app = App::start_http(server_host, APP_PORT, "server");
    let server = Sidecar::start_as(
        &env,
        &cp,
        server_host,
        "alpha",
        "server",
        "server",
        APP_PORT,
        "http",
    );
    let client = Sidecar::start_as(
        &env,
        &cp,
        client_host,
        "alpha",
        "client",
        "client",
        APP_PORT,
        "http",
    );
    let to = SocketAddr::from((server_host.ip(), APP_PORT));
    wait_for("the mesh path to carry a request", WAIT, || {
        matches!(http_get(client_host, to, "/warm"), Ok((200, _)))
    });
    let warm = client
        .metric("weft_requests_total{direction=\"outbound\",service=\"server\",code=\"200\"}");
    const N: u32 = 25;
    for i in 0..N {
        let (status, body) = http_get(client_host, to, &format!("/r/{i}")).expect("request");
        assert_eq!((status, body), (200, format!("server /r/{i}")));
    }
    let expected = warm + f64::from(N);

    let config = env.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sidecars\n    \
             static_configs:\n      - targets: ['{}:5670', '{}:5670']\n",
            client_host.ip(),
            server_host.ip()
        ),
    );
    let data = env.dir().join("prometheus-data");
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.dir().join("prometheus.log")).expect("prometheus log"));
    let _prometheus = Prometheus(Some(cp_host.spawn(cmd).expect("start prometheus")));
    let outbound = "sum(weft_requests_total{direction=\"outbound\",code=\"200\"})";
    let inbound = "sum(weft_requests_total{direction=\"inbound\",code=\"200\"})";
    let seen = || (promql(cp_host, outbound), promql(cp_host, inbound));
    let deadline = std::time::Instant::now() + WAIT * 3;
    while seen() != (Some(expected), Some(expected)) {
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(env.dir().join("prometheus.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let up = http_get(
                cp_host,
                SocketAddr::from(([127, 0, 0, 1], 9090)),
                "/api/v1/query?query=weft_requests_total",
            );
            panic!(
                "Prometheus saw {:?} (up: {up:?}), expected {expected} on both sides; its log ends:\n{}",
                seen(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    drop((client, server));
}
