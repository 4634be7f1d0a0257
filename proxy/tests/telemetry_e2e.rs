//! The running proxy's telemetry wiring end to end (`weft-proxy run`, the real control plane,
//! namespaces; root only, skipped visibly otherwise): the mesh's Prometheus endpoint appears
//! on the sidecar's host when the Mesh enables a metrics backend, moves when the backend's
//! port and path change, and closes when it is removed — scraped from another host of the
//! LAN, as the mesh's Prometheus would.

#[macro_use]
#[allow(unused_imports)] // the harness re-exports helpers this test does not need
mod e2e;

use e2e::{App, ControlPlane, Sidecar, WAIT, http_get, mesh_yaml, wait_for};
use std::net::SocketAddr;
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
