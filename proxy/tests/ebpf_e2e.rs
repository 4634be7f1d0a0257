//! End to end with the eBPF local redirect on (`weft-iptables ebpf install`, see the README's
//! "eBPF local redirect"): the mesh path of `l7_e2e.rs` — the real binaries, transparent
//! sidecars in network namespaces, mesh mTLS between them — carries HTTP/1.1 requests and a
//! streamed 16 MiB echo while the inbound sidecar's hop to its app skips the TCP/IP stack, and,
//! with the client host registered for the connect redirect (`weft-iptables ebpf
//! transparent`), the client app's hop to its sidecar too: the app connects to the server's
//! address, the programs send it to the sidecar's outbound port and answer the sidecar's
//! SO_ORIGINAL_DST with the server's address. Unregistered, the client's hop takes iptables
//! and the stack again while the server's stays redirected. It keeps carrying them after
//! `ebpf uninstall`, on the connection redirected before it and on new ones, which take the
//! stack again.
//!
//! The proof that a hop skipped the stack is its host's count of packets on its loopback
//! interface, which carries only that hop during the test (the mesh hop crosses the LAN, and
//! the test makes no admin calls meanwhile): a request and its response are at least two
//! loopback packets on the stack, and none when redirected.
//!
//! The programs are attached to a cgroup of the test's own, which holds the test process (its
//! apps and clients) and so every process it starts, and pinned in a bpf filesystem it mounts:
//! nothing outside the test is touched. The test is alone in this binary because the whole
//! process moves into that cgroup. Guards stop the processes, uninstall, move the process back,
//! remove the cgroup and unmount, also when the test fails.
//!
//! Needs root, clang at build time (for the programs) and bpftool; skipped, visibly, without
//! root. `.ci/run` installs clang and bpftool.

#[macro_use]
#[allow(unused_imports)] // the harness re-exports helpers this test does not need
mod e2e;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use e2e::in_host::{apps_runtime, listen_in, run_in};
use e2e::{ControlPlane, Env, Sidecar, WAIT, mesh_yaml, permission_yaml, wait_for};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_tests::Host;
use weft_tests::cgroup::{Mount, TestCgroup};

const APP_PORT: u16 = 8080;
const MESH: &str = "alpha";
/// Requests in each measured run.
const REQUESTS: u64 = 400;
/// The streamed echo's size.
const BULK: usize = 16 << 20;
const CHUNK: usize = 64 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// An HTTP/1.1 app on `0.0.0.0:port` inside `host` that answers each request with its own
/// body, streamed back as it arrives. `/close` retires every connection open at that moment:
/// each answers its next request (`/close` itself included) with `Connection: close`, so the
/// inbound sidecar's requests after that go on connections opened after it, whichever of its
/// pooled connections it picks.
fn echo_app(rt: &tokio::runtime::Runtime, host: &Host, port: u16) {
    let l = listen_in(host, port);
    let generation = Arc::new(AtomicU64::new(0));
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).expect("a tokio listener");
        while let Ok((s, _)) = l.accept().await {
            let generation = Arc::clone(&generation);
            let born = generation.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let generation = Arc::clone(&generation);
                    async move {
                        let mut response = if req.uri().path() == "/close" {
                            generation.fetch_add(1, Ordering::SeqCst);
                            Response::new(
                                Full::new(Bytes::from_static(b"closing"))
                                    .map_err(|never| match never {})
                                    .boxed(),
                            )
                        } else {
                            Response::new(req.into_body().boxed())
                        };
                        if generation.load(Ordering::SeqCst) > born {
                            response.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

/// Packets the host's loopback interface has carried (received; on loopback every packet sent
/// is received).
fn loopback_packets(host: &Host) -> u64 {
    let dev = host
        .enter(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .expect("enter")
        .expect("read /proc/net/dev");
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|counters| counters.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no loopback counters in {dev}"))
}

type HttpClient = Client<HttpConnector, BoxBody<Bytes, Infallible>>;

/// `POST url` with `body`; the response's status and body.
async fn post(client: &HttpClient, url: &str, body: Bytes) -> (StatusCode, Bytes) {
    let req = Request::post(url)
        .body(Full::new(body).boxed())
        .expect("a request");
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("no response to POST {url} in time"))
        .unwrap_or_else(|e| panic!("POST {url}: {e:?}"));
    let status = resp.status();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
        .await
        .expect("the body in time")
        .expect("the body")
        .to_bytes();
    (status, body)
}

/// Loopback packets of a run: the client host's (its app's hop to its sidecar) and the server
/// host's (the inbound sidecar's hop to its app).
#[derive(Debug, Clone, Copy)]
struct Packets {
    client: u64,
    server: u64,
}

impl Packets {
    fn now(client_host: &Host, server_host: &Host) -> Self {
        Self {
            client: loopback_packets(client_host),
            server: loopback_packets(server_host),
        }
    }

    fn since(self, client_host: &Host, server_host: &Host) -> Self {
        let now = Self::now(client_host, server_host);
        Self {
            client: now.client - self.client,
            server: now.server - self.server,
        }
    }
}

/// `REQUESTS` echo requests from the client host to `to`, one after another on one keep-alive
/// connection, each checked; both hosts' loopback packets meanwhile.
fn echo_run(client_host: &Host, server_host: &Host, to: SocketAddr, run: &str) -> Packets {
    let before = Packets::now(client_host, server_host);
    run_in(client_host, WAIT * 3, || async move {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        for i in 0..REQUESTS {
            let body = Bytes::from(format!("{run} request {i} {}", "x".repeat(1000)));
            let (status, echoed) = post(&client, &format!("http://{to}/echo"), body.clone()).await;
            assert_eq!(status, StatusCode::OK, "{run}: request {i}");
            assert_eq!(echoed, body, "{run}: request {i} came back changed");
        }
    });
    before.since(client_host, server_host)
}

/// Byte `i` of the streamed echo.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

/// A `BULK`-byte upload streamed in `CHUNK`s, echoed back and checked byte for byte; both
/// hosts' loopback packets meanwhile.
fn bulk_echo(client_host: &Host, server_host: &Host, to: SocketAddr) -> Packets {
    let before = Packets::now(client_host, server_host);
    run_in(client_host, WAIT * 3, || async move {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let chunks = (0..BULK / CHUNK).map(|c| {
            let chunk: Vec<u8> = (c * CHUNK..(c + 1) * CHUNK).map(pattern).collect();
            Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
        });
        let body = StreamBody::new(futures::stream::iter(chunks)).boxed();
        let req = Request::post(format!("http://{to}/bulk"))
            .body(body)
            .expect("a request");
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
            .await
            .expect("a response to the upload in time")
            .expect("a response to the upload");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut seen = 0;
        while let Some(frame) = tokio::time::timeout(REQUEST_TIMEOUT, body.frame())
            .await
            .expect("the echo keeps coming")
        {
            let frame = frame.expect("the echo");
            if let Ok(data) = frame.into_data() {
                for (j, b) in data.iter().enumerate() {
                    assert_eq!(*b, pattern(seen + j), "byte {} of the echo", seen + j);
                }
                seen += data.len();
            }
        }
        assert_eq!(seen, BULK, "bytes echoed");
    });
    before.since(client_host, server_host)
}

/// Has the app retire the inbound sidecar's connections to it (`/close`), then sends one
/// request, which opens the next one; these requests' packets are not in any count.
fn close_app_connection(client_host: &Host, to: SocketAddr) {
    run_in(client_host, WAIT, || async move {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let (status, body) = post(&client, &format!("http://{to}/close"), Bytes::new()).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"closing"[..]));
        let (status, _) = post(&client, &format!("http://{to}/echo"), Bytes::new()).await;
        assert_eq!(status, StatusCode::OK);
    });
}

/// `weft-iptables ebpf <args>` for the test's cgroup and bpf filesystem.
fn ebpf_command(env: &Env, args: &[&str], cgroup: &Path, bpffs: &Path) -> Command {
    let mut cmd = Command::new(&env.bins.iptables);
    cmd.arg("ebpf")
        .args(args)
        .args(["--name", "weft-e2e"])
        .arg("--cgroup-path")
        .arg(cgroup)
        .arg("--bpffs-path")
        .arg(bpffs);
    cmd
}

/// Runs `weft-iptables ebpf <action>` for the test's cgroup and bpf filesystem.
fn weft_iptables_ebpf(env: &Env, action: &str, cgroup: &Path, bpffs: &Path) {
    let out = ebpf_command(env, &[action], cgroup, bpffs)
        .output()
        .expect("run weft-iptables");
    assert!(
        out.status.success(),
        "weft-iptables ebpf {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `weft-iptables ebpf transparent <args>` in `host` (its network namespace is the one
/// registered or removed), with the proxy uid of the test's sidecars; what `ebpf show` says
/// there afterwards.
fn connect_redirect(env: &Env, host: &Host, args: &[&str], cgroup: &Path, bpffs: &Path) -> String {
    let mut all = vec!["transparent", "--proxy-uid"];
    let uid = e2e::PROXY_UID.to_string();
    all.push(&uid);
    all.extend_from_slice(args);
    env.run(host, ebpf_command(env, &all, cgroup, bpffs));
    env.run(host, ebpf_command(env, &["show"], cgroup, bpffs))
}

/// Uninstalls on drop (a no-op after the test's own uninstall).
struct Installed<'a> {
    env: &'a Env,
    cgroup: &'a Path,
    bpffs: &'a Path,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = Command::new(&self.env.bins.iptables)
            .args(["ebpf", "uninstall", "--name", "weft-e2e"])
            .arg("--cgroup-path")
            .arg(self.cgroup)
            .arg("--bpffs-path")
            .arg(self.bpffs)
            .output();
    }
}

/// Issue 7 with the eBPF local redirect: requests and a streamed 16 MiB echo pass through
/// both sidecars while the inbound's hop to its app is redirected and, with the client host
/// registered for the connect redirect, the client app's hop to its sidecar; and after the
/// redirect is uninstalled under the open connections.
#[test]
fn the_mesh_path_works_with_the_ebpf_redirect_on_and_after_it_is_removed() {
    let env = env_or_skip!("the_mesh_path_works_with_the_ebpf_redirect_on_and_after_it_is_removed");
    // Guards first: they drop after the processes and apps below.
    let cgroup2 = Mount::new("cgroup2", "none").expect("mount cgroup2");
    let bpffs = Mount::new("bpf", "bpf").expect("mount a bpf filesystem");
    let cgroup = TestCgroup::enter(cgroup2.path(), "weft-ebpf-e2e").expect("a test cgroup");
    let _installed = Installed {
        env: &env,
        cgroup: cgroup.path(),
        bpffs: bpffs.path(),
    };

    let (cp_host, client_host, server_host) =
        (env.host("cp"), env.host("client"), env.host("server"));
    let _lan = env
        .net
        .lan(&[&cp_host, &client_host, &server_host])
        .expect("a LAN");
    let cp = ControlPlane::start(&env, &cp_host);
    cp.apply(
        env.dir(),
        &format!(
            "{}---\n{}",
            mesh_yaml(MESH, true, "24h"),
            permission_yaml(MESH, "client-to-server", "client", "server")
        ),
    );
    let apps = apps_runtime();
    echo_app(&apps, &server_host, APP_PORT);
    let _server = Sidecar::start_as(
        &env,
        &cp,
        &server_host,
        MESH,
        "server",
        "server",
        APP_PORT,
        "http",
    );
    let _client = Sidecar::start(&env, &cp, &client_host, MESH, "client", "client", APP_PORT);
    let to = SocketAddr::from((server_host.ip(), APP_PORT));
    // Until the client's sidecar knows the server's endpoint, its request would be passed
    // through in plaintext and refused by the STRICT inbound.
    wait_for("the mesh path to the server", WAIT, || {
        run_in(&client_host, WAIT, || async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let req = Request::post(format!("http://{to}/echo"))
                .body(Full::new(Bytes::from_static(b"warm-up")).boxed())
                .expect("a request");
            matches!(
                tokio::time::timeout(REQUEST_TIMEOUT, client.request(req)).await,
                Ok(Ok(resp)) if resp.status() == StatusCode::OK
            )
        })
    });

    // On the stack: the inbound's pooled connection to the app was made before the install,
    // and the client app's connections go through iptables' REDIRECT.
    let on_stack = echo_run(&client_host, &server_host, to, "before");
    for (hop, packets) in [
        ("the client's", on_stack.client),
        ("the server's", on_stack.server),
    ] {
        assert!(
            packets >= 2 * REQUESTS,
            "a request and its response are at least two loopback packets on {hop} stack: \
             {packets} for {REQUESTS} requests"
        );
    }

    weft_iptables_ebpf(&env, "install", cgroup.path(), bpffs.path());
    let shown = connect_redirect(&env, &client_host, &[], cgroup.path(), bpffs.path());
    assert!(
        shown.contains("this network namespace is registered"),
        "ebpf show in the client host: {shown}"
    );
    // The inbound's next connection to the app is made under the programs.
    close_app_connection(&client_host, to);
    let redirected = echo_run(&client_host, &server_host, to, "installed");
    let bulk_redirected = bulk_echo(&client_host, &server_host, to);
    for (hop, packets) in [
        ("the client app's hop to its sidecar", redirected.client),
        ("the inbound's hop to its app", redirected.server),
    ] {
        assert!(
            packets < REQUESTS / 10,
            "with the redirect {hop} takes no loopback packets: {packets} for {REQUESTS} \
             requests (on the stack: {on_stack:?})"
        );
    }
    assert!(
        bulk_redirected.client < 64 && bulk_redirected.server < 64,
        "a redirected 16 MiB echo takes no loopback packets: {bulk_redirected:?}"
    );

    // Out of the connect redirect, the client's next connections take iptables and the
    // stack again; the server's hop stays redirected.
    let shown = connect_redirect(
        &env,
        &client_host,
        &["--remove"],
        cgroup.path(),
        bpffs.path(),
    );
    assert!(
        shown.contains("this network namespace is not registered"),
        "ebpf show in the client host after --remove: {shown}"
    );
    let unregistered = echo_run(&client_host, &server_host, to, "unregistered");
    assert!(
        unregistered.client >= 2 * REQUESTS && unregistered.server < REQUESTS / 10,
        "unregistered, only the client's hop takes the stack: {unregistered:?} for {REQUESTS} \
         requests"
    );
    connect_redirect(&env, &client_host, &[], cgroup.path(), bpffs.path());

    // Removed under the open connections: they keep working (the kernel keeps the programs
    // and the map until the last redirected socket closes: taking a socket out of the map
    // would drop what is queued on it), and connections made after it take the stack.
    weft_iptables_ebpf(&env, "uninstall", cgroup.path(), bpffs.path());
    let kept = echo_run(&client_host, &server_host, to, "uninstalled");
    close_app_connection(&client_host, to);
    let after = echo_run(&client_host, &server_host, to, "after");
    let bulk_after = bulk_echo(&client_host, &server_host, to);
    assert!(
        after.client >= 2 * REQUESTS && after.server >= 2 * REQUESTS,
        "after the uninstall new connections are on the stack: {after:?} loopback packets for \
         {REQUESTS} requests"
    );
    eprintln!(
        "loopback packets (client host, server host) for {REQUESTS} requests: {on_stack:?} \
         before the install, {redirected:?} installed, {unregistered:?} with the client host \
         unregistered, {kept:?} right after the uninstall, {after:?} on new connections; for a \
         16 MiB echo: {bulk_redirected:?} installed, {bulk_after:?} after"
    );
}
