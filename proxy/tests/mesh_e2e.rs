//! End-to-end tests of the mesh: the real `weft-control`, `weftctl`, `weft-iptables` and
//! `weft-proxy` binaries in network namespaces, apps that only call `connect()`, and
//! transparent sidecars between them.
//!
//! Each test builds its own LAN (`10.77.0.0/24`, one bridge in a namespace of its own): a
//! control-plane host, and hosts with an app and a sidecar (iptables rules + `weft-proxy` as
//! uid 5678). Everything — processes, rules, namespaces, files — goes when the test ends,
//! also when it fails (then the tail of every process's log is printed).
//!
//! Needs root; skipped, visibly, otherwise. Needs every weft binary built: `cargo test
//! --workspace` (the README's test command) builds them all before running any test.

#[macro_use]
mod e2e;

use e2e::{
    App, Capture, ControlPlane, Env, Sidecar, ThreeHosts, WAIT, connect, contains, dataplane_yaml,
    exchange, mesh_yaml, permission_yaml, request, request_from, unique, wait_for,
};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_tests::Host;

const APP_PORT: u16 = 8080;

/// Mesh `alpha` with a builtin CA and STRICT mTLS, `client` allowed to call `server`, and a
/// sidecar on each of the two hosts; the server host runs the app "server" on 8080.
struct TwoHosts {
    client: Sidecar,
    server: Sidecar,
    app: App,
    cp: ControlPlane,
}

impl TwoHosts {
    fn start(env: &Env, cp_host: &Host, client: &Host, server: &Host, lifetime: &str) -> Self {
        let cp = ControlPlane::start(env, cp_host);
        cp.apply(
            env.dir(),
            &format!(
                "{}---\n{}",
                mesh_yaml("alpha", true, lifetime),
                permission_yaml("alpha", "client-to-server", "client", "server")
            ),
        );
        let app = App::start(server, APP_PORT, "server");
        let server = Sidecar::start(env, &cp, server, "alpha", "server", "server", APP_PORT);
        let client = Sidecar::start(env, &cp, client, "alpha", "client", "client", APP_PORT);
        let two = TwoHosts {
            client,
            server,
            app,
            cp,
        };
        two.wait_for_mesh_path();
        two
    }

    fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.server.host.ip(), APP_PORT))
    }

    /// Until the client's sidecar knows the server's endpoint, its connection would be
    /// passed through in plaintext (and refused by the STRICT inbound): wait for a reply.
    fn wait_for_mesh_path(&self) {
        let to = self.server_addr();
        wait_for("the client's sidecar to reach the server", WAIT, || {
            request_from(&self.client.host, to, "warm-up").is_ok()
        });
    }
}

/// Issue 6: the client app's plain `connect()` to the server's IP:port goes through both
/// sidecars, and the wire between the hosts carries no plaintext of the request. STRICT
/// refuses a plaintext client that has no sidecar (its bytes do show up on the wire, which
/// also proves the capture sees the traffic).
#[test]
fn two_hosts_talk_through_transparent_sidecars_over_mtls() {
    let env = env_or_skip!("two_hosts_talk_through_transparent_sidecars_over_mtls");
    let (cp_host, client_host, server_host, plain_host) = (
        env.host("cp"),
        env.host("client"),
        env.host("server"),
        env.host("plain"),
    );
    let lan = env
        .net
        .lan(&[&cp_host, &client_host, &server_host, &plain_host])
        .expect("a LAN");
    let mesh = TwoHosts::start(&env, &cp_host, &client_host, &server_host, "24h");
    let to = mesh.server_addr();

    let capture = Capture::start(&lan.bridge_netns);
    let secret = format!("SECRET-{}", unique());
    let reply = request_from(&client_host, to, &secret).expect("the request goes through");
    // The app saw the connection from the server sidecar's loop-guard address, not from the
    // client host: it went through the server's sidecar.
    assert_eq!(reply, format!("server 127.0.0.6 {secret}"));

    let accepted = mesh.app.accepted();
    let inbound_failures = mesh
        .server
        .metric("weft_tls_handshake_failures_total{direction=\"inbound\"}");
    let plain = format!("PLAIN-{}", unique());
    let refused = request_from(&plain_host, to, &plain);
    assert!(
        refused.is_err(),
        "STRICT answered a plaintext client: {refused:?}"
    );
    let wire = capture.finish();

    assert!(
        contains(&wire, &plain),
        "the capture did not see the plaintext client's bytes ({} bytes captured)",
        wire.len()
    );
    assert!(
        !contains(&wire, &secret),
        "the request crossed the wire in plaintext"
    );
    assert_eq!(
        mesh.app.accepted(),
        accepted,
        "the plaintext client reached the app"
    );
    assert!(
        mesh.server
            .metric("weft_tls_handshake_failures_total{direction=\"inbound\"}")
            > inbound_failures
    );
    assert!(
        mesh.client
            .metric("weft_connections_total{direction=\"outbound\",protocol=\"tcp\"}")
            >= 1.0
    );
}

/// Issue 6: passthrough on reaches a host outside the mesh and off does not (the counter says
/// which); a proxy of another mesh cannot reach mesh alpha's service; a source without
/// permission is refused.
#[test]
fn mesh_boundaries_hold() {
    let env = env_or_skip!("mesh_boundaries_hold");
    let hosts: Vec<Host> = ["cp", "client", "server", "stranger", "intruder", "outside"]
        .iter()
        .map(|l| env.host(l))
        .collect();
    let [
        cp_host,
        client_host,
        server_host,
        stranger_host,
        intruder_host,
        outside_host,
    ] = &hosts[..]
    else {
        unreachable!()
    };
    env.net
        .lan(&hosts.iter().collect::<Vec<_>>())
        .expect("a LAN");
    let mesh = TwoHosts::start(&env, cp_host, client_host, server_host, "24h");
    let (cp, to) = (&mesh.cp, mesh.server_addr());

    // Passthrough on: the outside host's plain server answers, counted as allowed.
    let outside_app = App::start(outside_host, 9000, "outside");
    let outside = SocketAddr::from((outside_host.ip(), 9000));
    let allowed = "weft_passthrough_connections_total{decision=\"allowed\"}";
    let blocked = "weft_passthrough_connections_total{decision=\"blocked\"}";
    let (allowed0, blocked0) = (mesh.client.metric(allowed), mesh.client.metric(blocked));
    let reply = request_from(client_host, outside, "out-1").expect("passthrough on");
    assert_eq!(reply, format!("outside {} out-1", client_host.ip()));
    assert_eq!(mesh.client.metric(allowed), allowed0 + 1.0);
    assert_eq!(mesh.client.metric(blocked), blocked0);

    // Passthrough off: closed at once, nothing reaches the outside host.
    cp.apply(env.dir(), &mesh_yaml("alpha", false, "24h"));
    wait_for("passthrough off to reach the client", WAIT, || {
        mesh.client.config()["mesh"]["passthrough"] == false
    });
    let before = outside_app.accepted();
    let refused = request_from(client_host, outside, "out-2");
    assert!(refused.is_err(), "passthrough off let through: {refused:?}");
    assert_eq!(outside_app.accepted(), before, "a connection left the mesh");
    assert_eq!(mesh.client.metric(allowed), allowed0 + 1.0);
    assert_eq!(mesh.client.metric(blocked), blocked0 + 1.0);

    // A source the permissions do not name: mTLS succeeds, then the inbound closes.
    let stranger = Sidecar::start(
        &env,
        cp,
        stranger_host,
        "alpha",
        "stranger",
        "stranger",
        APP_PORT,
    );
    wait_for("the stranger's sidecar to know the server", WAIT, || {
        stranger.config().to_string().contains(&to.ip().to_string())
    });
    let accepted = mesh.app.accepted();
    let refused = request_from(stranger_host, to, "let-me-in");
    assert!(refused.is_err(), "a denied source got through: {refused:?}");
    assert_eq!(
        mesh.app.accepted(),
        accepted,
        "a denied source reached the app"
    );
    assert_eq!(mesh.server.metric("weft_authz_denied_total"), 1.0);
    assert_eq!(stranger.metric("weft_authz_denied_total"), 0.0);

    // A proxy of mesh beta, which (by a Dataplane applied by hand) believes beta's `server`
    // lives at alpha's server address: the handshake fails on both sides.
    cp.apply(
        env.dir(),
        &format!(
            "{}---\n{}",
            mesh_yaml("beta", true, "24h"),
            dataplane_yaml("beta", "impostor", server_host.ip(), "server", APP_PORT)
        ),
    );
    let intruder = Sidecar::start(
        &env,
        cp,
        intruder_host,
        "beta",
        "intruder",
        "intruder",
        APP_PORT,
    );
    wait_for("the intruder's sidecar to know the impostor", WAIT, || {
        intruder.config().to_string().contains(&to.ip().to_string())
    });
    let out_fail = "weft_tls_handshake_failures_total{direction=\"outbound\"}";
    let in_fail = "weft_tls_handshake_failures_total{direction=\"inbound\"}";
    let server_failures = mesh.server.metric(in_fail);
    let refused = request_from(intruder_host, to, "from-beta");
    assert!(
        refused.is_err(),
        "mesh beta reached mesh alpha: {refused:?}"
    );
    assert_eq!(mesh.app.accepted(), accepted, "mesh beta reached the app");
    assert_eq!(intruder.metric(out_fail), 1.0);
    wait_for("the server to count the failed handshake", WAIT, || {
        mesh.server.metric(in_fail) > server_failures
    });
    assert_eq!(mesh.server.metric("weft_authz_denied_total"), 1.0);

    // The client, allowed all along, still gets through.
    request_from(client_host, to, "still-fine").expect("the allowed client");
}

/// Issue 6: a config change and certificate renewals (6 s certificates, renewed at 4/5)
/// during a 1,000-request stream lose no request, on new connections or on one that stays
/// open throughout.
#[test]
fn config_change_and_cert_renewal_lose_no_request() {
    let env = env_or_skip!("config_change_and_cert_renewal_lose_no_request");
    let hosts = ThreeHosts::new(&env);
    let (cp_host, client_host, server_host) = (&hosts.cp, &hosts.client, &hosts.server);
    let mesh = TwoHosts::start(&env, cp_host, client_host, server_host, "6s");
    let to = mesh.server_addr();
    let serials = (mesh.client.cert_serial(), mesh.server.cert_serial());
    let acks = |s: &Sidecar| s.metric("weft_config_updates_total{result=\"ack\"}");
    let acks_before = (acks(&mesh.client), acks(&mesh.server));

    const REQUESTS: usize = 1000;
    const PACE: Duration = Duration::from_millis(8);
    let done = Arc::new(AtomicBool::new(false));
    let stream = {
        let done = done.clone();
        client_host
            .thread(move || {
                let start = Instant::now();
                let mut failures = Vec::new();
                for i in 0..REQUESTS {
                    let line = format!("req-{i}");
                    match request(to, &line) {
                        Ok(r) if r.ends_with(&line) => {}
                        other => failures.push(format!("{line}: {other:?}")),
                    }
                    if failures.len() >= 10 {
                        break; // Enough to tell; keep the test bounded.
                    }
                    if let Some(wait) = (PACE * (i as u32 + 1)).checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                done.store(true, Ordering::SeqCst);
                failures
            })
            .expect("the stream")
    };
    let open = {
        let done = done.clone();
        client_host
            .thread(move || {
                let mut failures = Vec::new();
                let mut conn = connect(to).expect("the long-lived connection");
                let mut i = 0;
                while !done.load(Ordering::SeqCst) {
                    let line = format!("open-{i}");
                    match exchange(&mut conn, &line) {
                        Ok(r) if r.ends_with(&line) => {}
                        other => failures.push(format!("{line}: {other:?}")),
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                (i, failures)
            })
            .expect("the long-lived connection")
    };

    std::thread::sleep(Duration::from_millis(1500));
    mesh.cp.apply(
        env.dir(),
        &format!(
            "{}---\n{}",
            mesh_yaml("alpha", false, "6s"),
            // For another destination: Kuma applies one TrafficPermission per inbound, so
            // a newer one for `server` would replace `client-to-server`.
            permission_yaml("alpha", "unrelated", "nobody", "elsewhere")
        ),
    );
    wait_for("the config change to reach both proxies", WAIT, || {
        acks(&mesh.client) > acks_before.0 && acks(&mesh.server) > acks_before.1
    });
    assert_eq!(mesh.client.config()["mesh"]["passthrough"], false);
    wait_for("both certificates to be renewed", WAIT, || {
        mesh.client.cert_serial() != serials.0 && mesh.server.cert_serial() != serials.1
    });
    assert!(
        !done.load(Ordering::SeqCst),
        "the stream ended before the renewals: make it longer"
    );

    let failures = stream.join().expect("the stream");
    let (open_requests, open_failures) = open.join().expect("the long-lived connection");
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} requests lost: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        open_failures.is_empty(),
        "the long-lived connection lost requests: {open_failures:?}"
    );
    assert!(open_requests > 100);
    for s in [&mesh.client, &mesh.server] {
        assert_eq!(s.metric("weft_config_updates_total{result=\"nack\"}"), 0.0);
    }
}

/// Issue 6: SIGTERM drains: `/ready` turns 503, new connections are refused, the request in
/// flight completes, the proxy exits 0 and its dataplane is deregistered.
#[test]
fn sigterm_drain_loses_no_in_flight_request() {
    let env = env_or_skip!("sigterm_drain_loses_no_in_flight_request");
    let hosts = ThreeHosts::new(&env);
    let (cp_host, client_host, server_host) = (&hosts.cp, &hosts.client, &hosts.server);
    let mut mesh = TwoHosts::start(&env, cp_host, client_host, server_host, "24h");
    let to = mesh.server_addr();

    let accepted = mesh.app.accepted();
    let slow = client_host
        .thread(move || request(to, "SLOW 2000 in-flight"))
        .expect("the slow request");
    wait_for("the slow request to reach the app", WAIT, || {
        mesh.app.accepted() > accepted
    });
    let sent = Instant::now();
    mesh.client.signal(Signal::SIGTERM);
    mesh.server.signal(Signal::SIGTERM);
    for s in [&mesh.client, &mesh.server] {
        wait_for(&format!("{} to fail /ready", s.name), WAIT, || {
            s.admin("/ready").0 == 503
        });
    }
    let refused = request_from(client_host, to, "too-late");
    assert!(
        refused.is_err(),
        "a draining proxy took a new request: {refused:?}"
    );

    let reply = slow.join().expect("the slow request");
    assert_eq!(
        reply.expect("the in-flight request completes"),
        "server 127.0.0.6 SLOW 2000 in-flight"
    );
    for s in [&mut mesh.client, &mut mesh.server] {
        let status = s.wait(Duration::from_secs(15));
        assert!(status.success(), "{} exited with {status}", s.name);
    }
    assert!(
        sent.elapsed() < Duration::from_secs(8),
        "the drain waited for its whole window"
    );
    for name in ["client", "server"] {
        let (status, body) = mesh.cp.get(&format!("/meshes/alpha/dataplanes/{name}"));
        assert_eq!(status, 404, "dataplane {name} still registered: {body}");
    }
}

/// Issue 4: a proxy keeps serving with its config and certificate while the control plane is
/// down (`weft_control_plane_connected` 0), and reconnects when it comes back on the same
/// data directory.
#[test]
fn proxies_survive_a_control_plane_restart() {
    let env = env_or_skip!("proxies_survive_a_control_plane_restart");
    let hosts = ThreeHosts::new(&env);
    let (cp_host, client_host, server_host) = (&hosts.cp, &hosts.client, &hosts.server);
    let mut mesh = TwoHosts::start(&env, cp_host, client_host, server_host, "24h");
    let to = mesh.server_addr();
    let connected = "weft_control_plane_connected";
    for s in [&mesh.client, &mesh.server] {
        assert_eq!(s.metric(connected), 1.0);
    }

    let versions = (
        mesh.client.config()["version"].clone(),
        mesh.server.config()["version"].clone(),
    );
    assert!(
        versions.0.is_string() && versions.1.is_string(),
        "{versions:?}"
    );
    mesh.cp.kill();
    for s in [&mesh.client, &mesh.server] {
        wait_for(&format!("{} to notice", s.name), WAIT, || {
            s.metric(connected) == 0.0
        });
    }
    for i in 0..5 {
        let reply = request_from(client_host, to, &format!("cp-down-{i}"));
        assert_eq!(
            reply.expect("traffic flows without the control plane"),
            format!("server 127.0.0.6 cp-down-{i}")
        );
    }
    assert_eq!(mesh.client.admin("/ready").0, 200);
    assert_eq!(mesh.server.admin("/ready").0, 200);
    assert_eq!(mesh.client.config()["version"], versions.0);
    assert_eq!(mesh.server.config()["version"], versions.1);

    mesh.cp.restart();
    for s in [&mesh.client, &mesh.server] {
        wait_for(&format!("{} to reconnect", s.name), WAIT, || {
            s.metric(connected) == 1.0
        });
    }
    let (status, body) = mesh.cp.get("/meshes/alpha/dataplanes+insights");
    assert_eq!(status, 200, "{body}");
    let insights: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    for item in insights["items"].as_array().expect("items") {
        assert_eq!(
            item["dataplaneInsight"]["online"], true,
            "{} is not online again: {item}",
            item["name"]
        );
    }
    request_from(client_host, to, "cp-back").expect("traffic after the restart");
}

/// A control plane whose host goes silent (packets to it vanish: no reset, no end of stream,
/// as when its machine dies or the network splits) is noticed through the proxies' HTTP/2
/// keepalive pings (`CP_KEEPALIVE`, 20 s, and as long for the answer): without them the
/// discovery stream would wait for TCP to give up, about 15 minutes. Traffic flows meanwhile,
/// and the proxies reconnect once the host answers again.
#[test]
fn proxies_notice_a_silent_control_plane_host() {
    let env = env_or_skip!("proxies_notice_a_silent_control_plane_host");
    let hosts = ThreeHosts::new(&env);
    let (cp_host, client_host) = (&hosts.cp, &hosts.client);
    let mesh = TwoHosts::start(&env, cp_host, client_host, &hosts.server, "24h");
    let to = mesh.server_addr();
    let connected = "weft_control_plane_connected";
    for s in [&mesh.client, &mesh.server] {
        assert_eq!(s.metric(connected), 1.0);
    }
    // Every packet to or from the control plane's host is dropped from now on (so neither
    // its own pings nor its closing of the connection reach the proxies); its ARP still
    // answers, so the senders see no error at all. The rules go with the host's namespace.
    cp_host
        .sh("iptables -I INPUT -j DROP && iptables -I OUTPUT -j DROP")
        .expect("black-hole the control plane's host");
    // A ping goes out at most 20 s after the last one, and its answer is awaited 20 s.
    let keepalive_bound = Duration::from_secs(2 * 20 + 15);
    for s in [&mesh.client, &mesh.server] {
        wait_for(
            &format!("{} to notice the silent control plane", s.name),
            keepalive_bound,
            || s.metric(connected) == 0.0,
        );
    }
    request_from(client_host, to, "cp-silent").expect("traffic flows without the control plane");
    cp_host
        .sh("iptables -D INPUT -j DROP && iptables -D OUTPUT -j DROP")
        .expect("let the control plane's host answer again");
    // The reconnect backoff is capped at 15 s, a connect attempt at 5 s.
    let reconnect_bound = Duration::from_secs(15 + 5 + 15);
    for s in [&mesh.client, &mesh.server] {
        wait_for(&format!("{} to reconnect", s.name), reconnect_bound, || {
            s.metric(connected) == 1.0
        });
    }
    request_from(client_host, to, "cp-answers").expect("traffic after the reconnect");
}

/// A dataplane whose services change (here: an inbound added through the REST API while its
/// proxy is connected) gets a certificate naming them at once, not at its next renewal (at
/// 4/5 of 24 h): until then its peers could not verify it as the new service.
#[test]
fn a_dataplane_whose_services_change_is_certified_for_them() {
    let env = env_or_skip!("a_dataplane_whose_services_change_is_certified_for_them");
    let hosts = ThreeHosts::new(&env);
    let mesh = TwoHosts::start(&env, &hosts.cp, &hosts.client, &hosts.server, "24h");
    let sans = |s: &Sidecar| -> Vec<String> {
        let (status, body) = s.admin("/certs");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/certs is JSON");
        v["certificates"][0]["sans"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(sans(&mesh.server), ["spiffe://alpha/server"]);
    let serial = mesh.server.cert_serial();

    let one = dataplane_yaml("alpha", "server", hosts.server.ip(), "server", APP_PORT);
    let two = one.replace(
        "  transparentProxying:",
        &format!(
            "    - port: {port}\n      servicePort: {port}\n      tags:\n        kuma.io/service: server-admin\n        kuma.io/protocol: tcp\n  transparentProxying:",
            port = APP_PORT + 1
        ),
    );
    assert_ne!(one, two, "the second inbound went in");
    mesh.cp.apply(env.dir(), &two);
    wait_for("a certificate naming both services", WAIT, || {
        let now = sans(&mesh.server);
        now.contains(&"spiffe://alpha/server-admin".to_string())
            && now.contains(&"spiffe://alpha/server".to_string())
    });
    assert_ne!(mesh.server.cert_serial(), serial);
    // The client's certificate rests on nothing that changed.
    request_from(&mesh.client.host, mesh.server_addr(), "after").expect("the mesh path");
}

/// A snapshot the proxy refuses (here: an explicit outbound on a port something else holds)
/// leaves all of the snapshot in force, the mesh's telemetry too: the Prometheus endpoint
/// stays on its port and does not move to the one the refused snapshot names.
#[test]
fn a_refused_snapshot_leaves_the_telemetry_in_force() {
    let env = env_or_skip!("a_refused_snapshot_leaves_the_telemetry_in_force");
    let hosts = ThreeHosts::new(&env);
    let (old_port, new_port, held_port) = (5670u16, 5671u16, 10_070u16);
    let with_metrics = |port: u16| {
        format!(
            "{}metrics:\n  enabledBackend: prom-1\n  backends:\n    - name: prom-1\n      type: prometheus\n      conf: {{port: {port}, path: /metrics}}\n",
            mesh_yaml("alpha", true, "24h")
        )
    };
    let cp = ControlPlane::start(&env, &hosts.cp);
    cp.apply(env.dir(), &with_metrics(old_port));
    let server_host = &hosts.server;
    let _app = App::start(server_host, APP_PORT, "server");
    let server = Sidecar::start(
        &env,
        &cp,
        server_host,
        "alpha",
        "server",
        "server",
        APP_PORT,
    );
    let scrape = |port: u16| {
        e2e::http_get(
            server_host,
            SocketAddr::from((server_host.ip(), port)),
            "/metrics",
        )
        .map(|(status, _)| status)
        .unwrap_or(0)
    };
    wait_for("the mesh's Prometheus endpoint", WAIT, || {
        scrape(old_port) == 200
    });
    let nacks = |s: &Sidecar| s.metric("weft_config_updates_total{result=\"nack\"}");
    assert_eq!(nacks(&server), 0.0);

    // Something else holds the port of the outbound the Dataplane is given next.
    let _held = e2e::in_host::listen_in(server_host, held_port);
    let dataplane = dataplane_yaml("alpha", "server", server_host.ip(), "server", APP_PORT)
        .replace(
            "  transparentProxying:",
            &format!(
                "  outbound:\n    - port: {held_port}\n      address: 0.0.0.0\n      tags:\n        kuma.io/service: server\n  transparentProxying:"
            ),
        );
    cp.apply(env.dir(), &dataplane);
    wait_for(
        "the snapshot with the held port to be refused",
        WAIT,
        || nacks(&server) >= 1.0,
    );
    // Every snapshot from now on holds that outbound, so the proxy refuses the one that also
    // moves the metrics endpoint.
    let before = nacks(&server);
    cp.apply(env.dir(), &with_metrics(new_port));
    wait_for("the metrics change to be refused", WAIT, || {
        nacks(&server) > before
    });
    assert_eq!(scrape(old_port), 200, "the endpoint in force went away");
    assert_eq!(
        scrape(new_port),
        0,
        "the refused snapshot's endpoint is served"
    );
}
