//! Discovery end to end against the real control plane (in process), with simulated proxies
//! speaking the real gRPC protocol.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::in_process::{
    control_plane, control_plane_on, control_plane_with, put, put_off_runtime,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use weft_api::ResourceType;
use weft_api::proto::discovery_client::DiscoveryClient;
use weft_api::proto::discovery_request::Kind;
use weft_api::proto::{
    Ack, DiscoveryRequest, Nack, ProxyStats, Register, Snapshot, SnapshotPart, permission_rule,
};
use weft_control::run::ControlPlane;
use weft_proxy::cp::CpChannels;
use weft_proxy::discovery::Discovery;
use weft_proxy::identity::{Backoff, Identity, IdentityConfig, TokenSource};
use weft_proxy::metrics::Metrics;
use weft_tests::postgres::PgServer;

/// A simulated proxy: the real protocol, no data path.
struct FakeProxy {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<Snapshot>,
}

fn dataplane(mesh: &str, name: &str, service: &str, ip: &str) -> String {
    format!(
        "type: Dataplane\nmesh: {mesh}\nname: {name}\nnetworking:\n  address: {ip}\n  inbound:\n  - port: 8080\n    tags: {{kuma.io/service: {service}}}\n"
    )
}

/// A TLS channel to the dataplane server, trusting the control plane's CA.
async fn channel(addr: std::net::SocketAddr, data_dir: &std::path::Path) -> Channel {
    let ca = std::fs::read_to_string(data_dir.join("cp-ca.pem")).expect("cp-ca.pem");
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

fn token(cp: &ControlPlane, mesh: &str, name: &str) -> String {
    cp.identity
        .tokens()
        .issue(mesh, name, Duration::from_secs(3600))
        .expect("token")
        .token
}

/// A TCP relay in front of `target`: [`Relay::cut`] closes every connection through it under
/// both ends, as when a proxy dies or loses its network: no end of stream, no goodbye.
/// [`Relay::freeze`] stops carrying bytes but keeps the connections open, as when the proxy's
/// host vanishes: nothing arrives, and nothing says the connection is gone.
struct Relay {
    addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    frozen: tokio::sync::watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay bind");
        let addr = listener.local_addr().expect("relay address");
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tracked = conns.clone();
        let (frozen, frozen_rx) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let mut frozen = frozen_rx.clone();
                let task = tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {}
                        _ = async { frozen.wait_for(|f| *f).await.is_ok() } => {
                            // Hold both sockets open, silent, until cut or dropped.
                            std::future::pending::<()>().await;
                        }
                    }
                });
                tracked
                    .lock()
                    .expect("relay list")
                    .push(task.abort_handle());
            }
        });
        Relay {
            addr,
            conns,
            frozen,
            accept,
        }
    }

    /// Stops carrying bytes on every connection, and keeps them open.
    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Drops every relayed connection at once.
    fn cut(&self) {
        for conn in self.conns.lock().expect("relay list").drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A token from `cp`, issued on a blocking thread (it may create the mesh's signing key, and
/// the PostgreSQL store's client must not run on the async runtime).
async fn token_off_runtime(cp: &ControlPlane, mesh: &str, name: &str) -> String {
    let identity = cp.identity.clone();
    let (mesh, name) = (mesh.to_string(), name.to_string());
    tokio::task::spawn_blocking(move || {
        identity
            .tokens()
            .issue(&mesh, &name, Duration::from_secs(3600))
            .expect("token")
            .token
    })
    .await
    .expect("token thread")
}

fn mesh_and_name(dataplane: &str) -> (String, String) {
    let doc = weft_api::parse::parse_documents(dataplane)
        .expect("dataplane")
        .remove(0)
        .resource;
    (doc.mesh_name().to_string(), doc.name)
}

async fn connect(cp: &ControlPlane, dataplane: String) -> Result<FakeProxy, tonic::Status> {
    let (mesh, name) = mesh_and_name(&dataplane);
    let token = token(cp, &mesh, &name);
    connect_with(cp, dataplane, Some(token)).await
}

async fn connect_with(
    cp: &ControlPlane,
    dataplane: String,
    token: Option<String>,
) -> Result<FakeProxy, tonic::Status> {
    let channel = channel(cp.dp_server_address, &cp.data_dir).await;
    register(channel, dataplane, token, vec![]).await
}

/// Connects as a proxy that keeps unchanged parts, as `weft-proxy` does.
async fn connect_keeping(cp: &ControlPlane, dataplane: String) -> Result<FakeProxy, tonic::Status> {
    let (mesh, name) = mesh_and_name(&dataplane);
    let token = token(cp, &mesh, &name);
    let channel = channel(cp.dp_server_address, &cp.data_dir).await;
    let all = weft_api::parts::ALL.iter().map(|p| *p as i32).collect();
    register(channel, dataplane, Some(token), all).await
}

/// Opens a discovery stream on `channel` and sends the Register, as a proxy does.
async fn register(
    channel: Channel,
    dataplane: String,
    token: Option<String>,
    keeps_parts: Vec<i32>,
) -> Result<FakeProxy, tonic::Status> {
    let mut client = DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let register = Register {
        dataplane,
        proxy_version: "test".into(),
        keeps_parts,
    };
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Register(register)),
    })
    .await
    .expect("send register");
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("metadata"),
        );
    }
    let resp = client.stream(req).await?;
    Ok(FakeProxy {
        tx,
        rx: resp.into_inner(),
    })
}

/// Connects from a runtime of its own, so the test can kill the connection abruptly by
/// shutting that runtime down, as a killed process would.
async fn connect_on_own_runtime(
    cp: &ControlPlane,
    dp: String,
) -> (tokio::runtime::Runtime, FakeProxy) {
    let addr = cp.dp_server_address;
    let dir = cp.data_dir.clone();
    let (mesh, name) = mesh_and_name(&dp);
    let token = token(cp, &mesh, &name);
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let proxy = rt.block_on(async move {
            register(channel(addr, &dir).await, dp, Some(token), vec![])
                .await
                .expect("registers")
        });
        (rt, proxy)
    })
    .await
    .expect("connect thread")
}

impl FakeProxy {
    async fn next(&mut self) -> Snapshot {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a snapshot within 5s")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn ack(&self, s: &Snapshot) {
        let ack = Ack {
            version: s.version.clone(),
            nonce: s.nonce.clone(),
        };
        self.tx
            .send(DiscoveryRequest {
                kind: Some(Kind::Ack(ack)),
            })
            .await
            .expect("ack");
    }

    /// Reports traffic totals, as a proxy does periodically.
    async fn report(&self, requests_total: u64, request_errors_total: u64) {
        self.tx
            .send(DiscoveryRequest {
                kind: Some(Kind::Stats(ProxyStats {
                    requests_total,
                    request_errors_total,
                    ..Default::default()
                })),
            })
            .await
            .expect("stats");
    }

    /// Reads snapshots until one satisfies `pred` (within 5 s).
    async fn next_matching(&mut self, what: &str, pred: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.message()).await {
                Ok(Ok(Some(s))) if pred(&s) => return s,
                Ok(Ok(Some(_))) => continue,
                other => panic!("{what}: no matching snapshot ({other:?})"),
            }
        }
    }

    async fn nack(&self, s: &Snapshot, reason: &str) {
        let nack = Nack {
            version: s.version.clone(),
            nonce: s.nonce.clone(),
            reason: reason.into(),
        };
        self.tx
            .send(DiscoveryRequest {
                kind: Some(Kind::Nack(nack)),
            })
            .await
            .expect("nack");
    }

    /// Asserts that nothing arrives for a while.
    async fn expect_silence(&mut self, what: &str) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(400), self.rx.message()).await {
            panic!("{what}: expected no snapshot, got {m:?}");
        }
    }
}

const PAYMENTS: &str = "type: Mesh\nname: payments\n---\ntype: Mesh\nname: other\n";

#[tokio::test]
async fn policies_reach_the_right_proxies_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, PAYMENTS);
    let mut web = connect(&cp, dataplane("payments", "web-1", "web", "10.0.0.1"))
        .await
        .expect("web registers");
    let s = web.next().await;
    web.ack(&s).await;
    let mut backend = connect(
        &cp,
        dataplane("payments", "backend-1", "backend", "10.0.0.2"),
    )
    .await
    .expect("backend registers");
    let b0 = backend.next().await;
    backend.ack(&b0).await;
    assert!(b0.inbounds[0].permissions.is_empty());
    // web learns the new endpoint.
    let s = web.next().await;
    let svc = s
        .outbounds
        .iter()
        .find(|o| o.service == "backend")
        .expect("backend service");
    assert_eq!(svc.endpoints[0].address, "10.0.0.2");
    web.ack(&s).await;
    let mut stranger = connect(&cp, dataplane("other", "backend-1", "backend", "10.0.0.3"))
        .await
        .expect("other mesh registers");
    let o0 = stranger.next().await;
    assert_eq!(o0.mesh.as_ref().expect("mesh").name, "other");
    assert!(
        o0.outbounds
            .iter()
            .all(|o| o.endpoints.iter().all(|e| e.address == "10.0.0.3")),
        "no endpoints of another mesh"
    );

    put(
        &cp,
        "type: MeshTrafficPermission\nmesh: payments\nname: backend-from-web\nspec:\n  targetRef: {kind: MeshService, name: backend}\n  from:\n  - targetRef: {kind: MeshService, name: web}\n    default: {action: Allow}\n  - targetRef: {kind: Mesh}\n    default: {action: Deny}\n",
    );
    let b1 = backend.next().await;
    let rules = &b1.inbounds[0].permissions;
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!(
        rules[0].source_service, "web",
        "the more specific entry first"
    );
    assert_eq!(rules[0].action, permission_rule::Action::Allow as i32);
    assert_eq!(rules[1].source_service, "*");
    assert_eq!(rules[1].action, permission_rule::Action::Deny as i32);
    backend.ack(&b1).await;
    web.expect_silence("web's snapshot did not change").await;
    stranger
        .expect_silence("another mesh is not affected")
        .await;

    // What was sent is visible, and the ACK is recorded.
    let status = cp.hub.status("payments", "backend-1").expect("status");
    assert_eq!(status.sent_version.as_deref(), Some(b1.version.as_str()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = cp.hub.status("payments", "backend-1").expect("status");
    assert_eq!(status.acked_version.as_deref(), Some(b1.version.as_str()));
    // _config rebuilds what was sent from the view it was built from: the same snapshot,
    // nonce included, also for a proxy whose snapshot the last change left alone.
    let sent = status.last_sent.expect("sent").snapshot();
    assert_eq!(sent, b1);
    let web_sent = cp.hub.status("payments", "web-1").expect("status");
    assert_eq!(web_sent.last_sent.expect("sent").snapshot(), s);
    cp.shutdown().await;
}

#[tokio::test]
async fn duplicate_name_is_refused_and_nack_is_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    let mut first = connect(&cp, dataplane("default", "dp-1", "web", "10.0.0.1"))
        .await
        .expect("first registers");
    let s = first.next().await;
    let err = connect(&cp, dataplane("default", "dp-1", "web", "10.0.0.9"))
        .await
        .err()
        .expect("second is refused");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    assert!(err.message().contains("already online"), "{err}");

    let nack = Nack {
        version: s.version.clone(),
        nonce: s.nonce.clone(),
        reason: "cannot bind port 8080".into(),
    };
    first
        .tx
        .send(DiscoveryRequest {
            kind: Some(Kind::Nack(nack)),
        })
        .await
        .expect("nack");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = cp.hub.status("default", "dp-1").expect("status");
    assert!(
        st.last_nack
            .as_deref()
            .is_some_and(|r| r.contains("cannot bind port 8080")),
        "{st:?}"
    );
    assert_eq!(st.acked_version, None);
    cp.shutdown().await;
}

#[tokio::test]
async fn invalid_registration_is_refused_with_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    let bad = "type: Dataplane\nmesh: default\nname: dp\nnetworking:\n  address: 10.0.0.1\n  inbound:\n  - port: 99999\n    tags: {kuma.io/service: a}\n";
    let t = token(&cp, "default", "dp");
    let err = connect_with(&cp, bad.into(), Some(t))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("networking.inbound[0].port"),
        "{err}"
    );
    let err = connect(&cp, dataplane("nowhere", "dp", "a", "10.0.0.1"))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("mesh \"nowhere\" does not exist"),
        "{err}"
    );
    // A Register is parsed before its token is checked: an oversized one is refused unread,
    // token or not.
    let mut huge = dataplane("default", "dp", "a", "10.0.0.1");
    huge.push_str(&format!("# {}\n", "x".repeat(300 << 10)));
    let err = connect_with(&cp, huge, None).await.err().expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("at most 256 KiB"), "{err}");
    cp.shutdown().await;
}

/// Deleting a mesh ends the streams of its proxies (NotFound): a mesh created later under the
/// same name is another mesh, whose configuration, trust bundle and permissions a stream
/// registered with the old mesh's token must not receive. The name registers again there.
#[tokio::test]
async fn deleting_a_mesh_ends_its_proxies_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, PAYMENTS);
    let dp = dataplane("payments", "web-1", "web", "10.0.0.1");
    let mut web = connect(&cp, dp.clone()).await.expect("registers");
    let s = web.next().await;
    web.ack(&s).await;

    let store = cp.store.clone();
    tokio::task::spawn_blocking(move || {
        store.delete(
            &weft_control::store::ResourceKey::mesh("payments".to_string()),
            true,
        )
    })
    .await
    .expect("delete")
    .expect("cascade delete");
    cp.hub.notify_change();
    let ended = tokio::time::timeout(Duration::from_secs(5), web.rx.message())
        .await
        .expect("the stream ends within 5 s");
    match ended {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
            assert!(status.message().contains("deleted"), "{status}");
        }
        Ok(other) => panic!("the stream went on after its mesh was deleted: {other:?}"),
    }
    assert!(cp.hub.status("payments", "web-1").is_none());

    // Recreated: another mesh, a new token, and the name is free.
    put(&cp, PAYMENTS);
    let mut again = connect(&cp, dp).await.expect("registers in the new mesh");
    again.next().await;
    cp.shutdown().await;
}

/// A proxy whose connection goes silent (its host vanished: no end of stream, no reset) is
/// dropped once it stops answering the server's pings, and its name can register again.
#[tokio::test]
async fn a_silent_proxy_is_dropped_by_keepalive_and_its_name_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane_with(dir.path(), None, Duration::from_millis(500)).await;
    let relay = Relay::start(cp.dp_server_address).await;
    let dp = dataplane("default", "web-1", "web", "10.0.0.1");
    let t = token(&cp, "default", "web-1");
    let mut web = register(
        channel(relay.addr, &cp.data_dir).await,
        dp.clone(),
        Some(t),
        vec![],
    )
    .await
    .expect("registers through the relay");
    let s = web.next().await;
    web.ack(&s).await;
    assert!(cp.hub.status("default", "web-1").expect("status").online);

    relay.freeze();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while cp.hub.status("default", "web-1").is_some_and(|s| s.online) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent proxy is still online 15 s later"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = connect(&cp, dp).await.expect("the name registers again");
    again.next().await;
    drop(web);
    cp.shutdown().await;
}

#[tokio::test]
async fn dropped_proxy_goes_offline_and_graceful_exit_deregisters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    let mut watcher = connect(&cp, dataplane("default", "watcher", "web", "10.0.0.1"))
        .await
        .expect("registers");
    watcher.next().await;
    let (killed_rt, mut killed) =
        connect_on_own_runtime(&cp, dataplane("default", "killed", "backend", "10.0.0.2")).await;
    killed.next().await;
    let s = watcher.next().await;
    let ep = |s: &Snapshot| {
        s.outbounds
            .iter()
            .find(|o| o.service == "backend")
            .map(|o| o.endpoints[0].healthy)
    };
    assert_eq!(ep(&s), Some(true));

    // A broken stream (the proxy died): offline, endpoint unhealthy, name free again.
    // A killed proxy: its connection dies with its runtime, without a clean end of stream.
    killed_rt.shutdown_background();
    drop(killed);
    watcher
        .next_matching("the dead proxy's endpoint turns unhealthy", |s| {
            ep(s) == Some(false)
        })
        .await;
    let st = cp.hub.status("default", "killed").expect("status");
    assert!(!st.online && st.last_seen.is_some(), "{st:?}");
    let key = weft_control::store::ResourceKey {
        ty: weft_api::ResourceType::Dataplane,
        mesh: "default".into(),
        name: "killed".into(),
    };
    assert!(
        cp.store.get(&key).expect("get").is_some(),
        "an offline dataplane stays listed"
    );

    // A clean close (graceful exit): deregistered.
    let mut again = connect(&cp, dataplane("default", "killed", "backend", "10.0.0.2"))
        .await
        .expect("name is free once offline");
    again.next().await;
    let FakeProxy { tx, mut rx } = again;
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), rx.message()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        cp.store.get(&key).expect("get").is_none(),
        "graceful exit deregisters"
    );
    watcher
        .next_matching("its endpoints are gone", |s| {
            s.outbounds.iter().all(|o| o.service != "backend")
        })
        .await;
    cp.shutdown().await;
}

#[tokio::test]
async fn a_token_for_one_mesh_never_registers_a_proxy_in_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, PAYMENTS);
    let dp = dataplane("payments", "backend-1", "backend", "10.0.0.2");
    let err = connect_with(&cp, dp.clone(), Some(token(&cp, "other", "backend-1")))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = connect_with(&cp, dp.clone(), Some(token(&cp, "payments", "web-1")))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = connect_with(&cp, dp.clone(), None)
        .await
        .err()
        .expect("refused");
    assert!(err.message().contains("missing dataplane token"), "{err}");
    let key = weft_control::store::ResourceKey {
        ty: weft_api::ResourceType::Dataplane,
        mesh: "payments".into(),
        name: "backend-1".into(),
    };
    assert!(
        cp.store.get(&key).expect("get").is_none(),
        "nothing registered"
    );
    connect_with(&cp, dp, Some(token(&cp, "payments", "backend-1")))
        .await
        .expect("the right token registers");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_revoked_token_stops_working_at_its_next_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    let issued = cp
        .identity
        .tokens()
        .issue("default", "dp-1", Duration::from_secs(3600))
        .expect("token");
    let dp = dataplane("default", "dp-1", "web", "10.0.0.1");
    let FakeProxy { tx, mut rx } = connect_with(&cp, dp.clone(), Some(issued.token.clone()))
        .await
        .expect("valid token registers");
    // Graceful exit, so the name is free again.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = rx.message().await {}
    })
    .await;

    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/tokens/dataplane/revocations",
            cp.api_address
        ))
        .body(serde_json::json!({"mesh": "default", "id": issued.claims.jti}).to_string())
        .send()
        .await
        .expect("revoke");
    assert_eq!(resp.status().as_u16(), 200);
    let err = connect_with(&cp, dp, Some(issued.token))
        .await
        .err()
        .expect("revoked token refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{err}");
    cp.shutdown().await;
}

/// A permission for backend from `source`: it changes backend proxies' inbounds only.
fn permission(source: &str) -> String {
    format!(
        "type: MeshTrafficPermission\nmesh: payments\nname: backend-from\nspec:\n  targetRef: {{kind: MeshService, name: backend}}\n  from:\n  - targetRef: {{kind: MeshService, name: {source}}}\n    default: {{action: Allow}}\n"
    )
}

fn kept(s: &Snapshot) -> Vec<SnapshotPart> {
    s.kept
        .iter()
        .map(|p| SnapshotPart::try_from(*p).expect("known part"))
        .collect()
}

/// The complete snapshot the control plane last sent to `name`, as `_config` shows it.
fn last_sent(cp: &ControlPlane, name: &str) -> Snapshot {
    let status = cp.hub.status("payments", name).expect("status");
    status.last_sent.expect("sent").snapshot()
}

#[tokio::test]
async fn a_permission_change_leaves_the_outbounds_out_and_the_proxy_fills_them_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, PAYMENTS);
    let mut backend = connect_keeping(
        &cp,
        dataplane("payments", "backend-1", "backend", "10.0.0.2"),
    )
    .await
    .expect("backend registers");
    let mut applied = backend.next().await;
    assert!(
        applied.kept.is_empty(),
        "a stream's first snapshot is complete"
    );
    assert_eq!(applied, last_sent(&cp, "backend-1"));
    backend.ack(&applied).await;
    let mut web = connect_keeping(&cp, dataplane("payments", "web-1", "web", "10.0.0.1"))
        .await
        .expect("web registers");
    let w0 = web.next().await;
    web.ack(&w0).await;
    // backend learns web's endpoint: only the outbounds changed.
    let b1 = backend
        .next_matching("web's endpoint", |s| !s.outbounds.is_empty())
        .await;
    assert_eq!(
        kept(&b1),
        [
            SnapshotPart::Dataplane,
            SnapshotPart::Mesh,
            SnapshotPart::Inbounds,
            SnapshotPart::OutboundListeners
        ]
    );
    let mut full = b1.clone();
    weft_api::parts::merge(&mut full, Some(&applied)).expect("merges");
    assert_eq!(full, last_sent(&cp, "backend-1"));
    assert_eq!(full.outbounds.len(), 2, "{:?}", full.outbounds);
    backend.ack(&full).await;
    applied = full;

    put(&cp, &permission("web"));
    let b2 = backend.next().await;
    assert!(b2.outbounds.is_empty(), "the outbounds did not change");
    assert!(b2.mesh.is_none() && b2.trust_bundle_pem.is_empty());
    assert!(kept(&b2).contains(&SnapshotPart::Outbounds));
    assert!(!kept(&b2).contains(&SnapshotPart::Inbounds));
    assert_eq!(b2.inbounds[0].permissions[0].source_service, "web");
    let mut full = b2.clone();
    weft_api::parts::merge(&mut full, Some(&applied)).expect("merges");
    assert_eq!(
        full,
        last_sent(&cp, "backend-1"),
        "merged: the complete snapshot"
    );
    assert_eq!(full.version, b2.version);
    assert_eq!(full.outbounds, applied.outbounds);
    backend.ack(&full).await;
    web.expect_silence("web's snapshot did not change").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = cp.hub.status("payments", "backend-1").expect("status");
    assert_eq!(status.acked_version.as_deref(), Some(full.version.as_str()));
    cp.shutdown().await;
}

#[tokio::test]
async fn a_reconnect_gets_a_complete_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, PAYMENTS);
    let dp = dataplane("payments", "backend-1", "backend", "10.0.0.2");
    let mut first = connect_keeping(&cp, dp.clone()).await.expect("registers");
    let s0 = first.next().await;
    first.ack(&s0).await;
    drop(first);
    // The graceful exit deregisters; then the name is free again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        match connect_keeping(&cp, dp.clone()).await {
            Ok(p) => break p,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no reconnect: {e}"),
        }
    };
    let s1 = again.next().await;
    assert!(s1.kept.is_empty(), "complete: {:?}", kept(&s1));
    assert_eq!(s1.version, s0.version, "same content");
    assert_eq!(
        Snapshot {
            nonce: s0.nonce.clone(),
            ..s1
        },
        s0
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn a_nack_makes_the_next_push_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, PAYMENTS);
    let mut backend = connect_keeping(
        &cp,
        dataplane("payments", "backend-1", "backend", "10.0.0.2"),
    )
    .await
    .expect("registers");
    let s0 = backend.next().await;
    backend.ack(&s0).await;

    // A push that keeps parts and is refused (the proxy lost its base, say) is resent
    // complete at once.
    put(&cp, &permission("web"));
    let s1 = backend.next().await;
    assert!(!s1.kept.is_empty());
    backend.nack(&s1, "no base").await;
    let s1_full = backend.next().await;
    assert!(s1_full.kept.is_empty(), "{:?}", kept(&s1_full));
    assert_eq!(s1_full.version, s1.version);
    assert_ne!(s1_full.nonce, s1.nonce);
    assert_eq!(s1_full, last_sent(&cp, "backend-1"));

    // A refused complete snapshot is not resent, but the next change comes complete.
    backend.nack(&s1_full, "cannot bind port 8080").await;
    backend
        .expect_silence("the same content again would be refused again")
        .await;
    put(&cp, &permission("billing"));
    let s2 = backend.next().await;
    assert!(s2.kept.is_empty(), "{:?}", kept(&s2));
    assert_eq!(s2, last_sent(&cp, "backend-1"));
    backend.ack(&s2).await;

    // Acknowledged: the next push keeps the parts that did not change again.
    put(&cp, &permission("web"));
    let s3 = backend.next().await;
    assert!(
        kept(&s3).contains(&SnapshotPart::Outbounds),
        "{:?}",
        kept(&s3)
    );

    // Two pushes out before the proxy answers the first: the NACK of the earlier one also
    // means the later one, built on it, cannot apply. It is resent complete at once, not left
    // waiting for the next change.
    put(&cp, &permission("billing"));
    let s4 = backend.next().await;
    assert!(!s4.kept.is_empty());
    put(&cp, &permission("web"));
    let s5 = backend.next().await;
    assert!(!s5.kept.is_empty());
    backend.nack(&s3, "cannot bind port 8080").await;
    let s5_full = backend.next().await;
    assert!(s5_full.kept.is_empty(), "{:?}", kept(&s5_full));
    assert_eq!(s5_full.version, s5.version);
    cp.shutdown().await;
}

const ALLOW_WEB: &str = "type: MeshTrafficPermission\nmesh: payments\nname: backend-from-web\nspec:\n  targetRef: {kind: MeshService, name: backend}\n  from:\n  - targetRef: {kind: MeshService, name: web}\n    default: {action: Allow}\n";

/// The `dataplaneInsight` of dataplane `name` of mesh `payments` in `cp`'s REST API, once it
/// satisfies `pred`: insights reach the other replicas at the next publication (every 5 s).
async fn insight_when(
    cp: &ControlPlane,
    name: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let url = format!(
        "http://{}/meshes/payments/dataplanes+insights",
        cp.api_address
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut last = serde_json::Value::Null;
    while tokio::time::Instant::now() < deadline {
        let answer: serde_json::Value = reqwest::get(&url)
            .await
            .expect("GET dataplanes+insights")
            .json()
            .await
            .expect("JSON");
        if let Some(item) = answer["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["name"] == name))
        {
            last = item["dataplaneInsight"].clone();
            if pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what}: the insight of {name} at {url} is still {last}");
}

/// Two control-plane replicas on one PostgreSQL store act as one control plane: they start
/// together without creating the default mesh twice, a token issued by one registers a proxy
/// at the other, a name online at one is refused at the other, what one replica writes
/// reaches the proxies connected to the other, each serves the `_config` of a proxy connected
/// to the other, and a proxy that dies at one is offline at both.
#[tokio::test]
async fn two_replicas_on_one_postgres_store_act_as_one_control_plane() {
    let (pg, url) = tokio::task::spawn_blocking(|| {
        let pg = PgServer::start().expect("start PostgreSQL");
        pg.create_database("replicas").expect("createdb");
        let url = pg.url("replicas");
        (pg, url)
    })
    .await
    .expect("PostgreSQL");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (a, b) = tokio::join!(
        control_plane_on(dir_a.path(), Some(url.clone())),
        control_plane_on(dir_b.path(), Some(url)),
    );
    let store = b.store.clone();
    let meshes = tokio::task::spawn_blocking(move || store.list(ResourceType::Mesh, None))
        .await
        .expect("list")
        .expect("list meshes");
    let names: Vec<_> = meshes.iter().map(|m| m.resource.name.as_str()).collect();
    assert_eq!(names, ["default"]);
    assert_eq!(
        meshes[0].meta.version, 1,
        "the default mesh was written once"
    );

    put_off_runtime(&a, PAYMENTS).await;
    let from_a = token_off_runtime(&a, "payments", "web-1").await;
    let mut web = connect_with(
        &b,
        dataplane("payments", "web-1", "web", "10.0.0.1"),
        Some(from_a),
    )
    .await
    .expect("a token from replica A registers web at replica B");
    let s = web.next().await;
    web.ack(&s).await;
    // A second proxy named web-1 is refused at the other replica too.
    let again = token_off_runtime(&a, "payments", "web-1").await;
    match connect_with(
        &a,
        dataplane("payments", "web-1", "web", "10.0.0.9"),
        Some(again),
    )
    .await
    {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status}");
            assert!(
                status.message().contains("another") || status.message().contains("replica"),
                "{status}"
            );
        }
        Ok(_) => panic!("a second web-1 registered at the other replica"),
    }
    let from_b = token_off_runtime(&b, "payments", "backend-1").await;
    // Through a relay, so that its connection can die under it below.
    let relay = Relay::start(a.dp_server_address).await;
    let mut backend = register(
        channel(relay.addr, &a.data_dir).await,
        dataplane("payments", "backend-1", "backend", "10.0.0.2"),
        Some(from_b),
        vec![],
    )
    .await
    .expect("a token from replica B registers backend at replica A");
    let b0 = backend.next().await;
    backend.ack(&b0).await;
    assert!(b0.inbounds[0].permissions.is_empty());

    // A stores backend's Dataplane; B sees the store move and tells web.
    let s = web
        .next_matching("backend's endpoint, registered at the other replica", |s| {
            s.outbounds.iter().any(|o| {
                o.service == "backend" && o.endpoints.iter().any(|e| e.address == "10.0.0.2")
            })
        })
        .await;
    web.ack(&s).await;
    // A permission written through B reaches backend at A.
    put_off_runtime(&b, ALLOW_WEB).await;
    let b1 = backend
        .next_matching("the permission written through the other replica", |s| {
            !s.inbounds[0].permissions.is_empty()
        })
        .await;
    assert_eq!(b1.inbounds[0].permissions[0].source_service, "web");
    backend.ack(&b1).await;

    // What a replica knows of its proxies shows at the other: web, at B, reports traffic,
    // and A's dataplanes+insights has it online with those totals.
    web.report(42, 2).await;
    let insight = insight_when(&a, "web-1", "web's report, made at B", |i| {
        i["stats"]["requestsTotal"] == 42
    })
    .await;
    assert_eq!(insight["online"], true, "{insight}");
    assert_eq!(insight["stats"]["requestErrorsTotal"], 2, "{insight}");
    assert_eq!(
        insight["controlPlaneInstanceId"],
        b.hub.replica(),
        "{insight}"
    );
    assert!(insight["ackedVersion"].is_string(), "{insight}");
    // Its _config, asked of A, is built at A from the store: the snapshot B sent (same
    // version), and a header naming B.
    let url = format!(
        "http://{}/meshes/payments/dataplanes/web-1/_config",
        a.api_address
    );
    let sent_by_b = last_sent(&b, "web-1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = reqwest::get(&url).await.expect("GET _config");
        assert_eq!(answer.status(), reqwest::StatusCode::OK);
        let source = answer
            .headers()
            .get("weft-config-source")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            source.contains(a.hub.replica()) && source.contains(b.hub.replica()),
            "{source}"
        );
        let config: serde_json::Value = answer.json().await.expect("_config is JSON");
        if config["version"] == sent_by_b.version.as_str() {
            assert_eq!(config["dataplane"]["name"], "web-1", "{config}");
            break;
        }
        // A may not have read the store revision B built from yet.
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's _config of web-1 stays at version {} (B sent {})",
            config["version"],
            sent_by_b.version
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // backend's connection to A dies under it, with no end of stream; web, at B, sees its
    // endpoint go unhealthy.
    relay.cut();
    web.next_matching(
        "the dead proxy's endpoint, unhealthy at the other replica",
        |s| {
            s.outbounds.iter().any(|o| {
                o.service == "backend"
                    && o.endpoints
                        .iter()
                        .any(|e| e.address == "10.0.0.2" && !e.healthy)
            })
        },
    )
    .await;
    // And B's dataplanes+insights has backend offline, with what A knew of it (B never
    // had it connected).
    let insight = insight_when(&b, "backend-1", "backend, dead at A", |i| {
        i["online"] == false && i["ackedVersion"].is_string()
    })
    .await;
    assert_eq!(insight["ackedVersion"], b1.version.as_str(), "{insight}");

    a.shutdown().await;
    b.shutdown().await;
    tokio::task::spawn_blocking(move || drop(pg))
        .await
        .expect("stop PostgreSQL");
}

/// A proxy given several replicas' addresses (`--cp-address A,B`) moves on from one that is
/// down: the first address answers nothing, and the proxy's real identity and discovery
/// clients get their certificate and configuration from the second.
#[tokio::test]
async fn a_proxy_moves_on_from_a_replica_that_is_down() {
    weft_proxy::tls::install_default_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, PAYMENTS);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let addresses = format!(
        "https://127.0.0.1:{dead_port},https://127.0.0.1:{}",
        cp.dp_server_address.port()
    );
    let ca = std::fs::read(cp.data_dir.join("cp-ca.pem")).expect("cp-ca.pem");
    let token = token(&cp, "payments", "web-1");

    let mut config = IdentityConfig::new(
        addresses.clone(),
        ca.clone(),
        "payments",
        "web-1",
        TokenSource::Inline(token.clone()),
    );
    config.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let identity = Identity::new(config, Arc::new(Metrics::new()));
    let certifying = identity.spawn();

    let replicas = CpChannels::new(&addresses, &ca, Duration::from_secs(5)).expect("addresses");
    let discovery = Arc::new(Discovery::new(
        replicas.clone(),
        dataplane("payments", "web-1", "web", "10.0.0.1"),
        TokenSource::Inline(token),
        Arc::new(Metrics::new()),
    ));
    let mut applied = discovery.applied();
    let shutdown = CancellationToken::new();
    let running = {
        let (d, s) = (discovery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run(Arc::new(|_: &Snapshot| Ok(())), s).await })
    };
    tokio::time::timeout(Duration::from_secs(15), applied.wait_for(|s| s.is_some()))
        .await
        .expect("a snapshot from the live replica within 15 s")
        .expect("discovery running");
    assert_eq!(replicas.current().0, 1, "on the second address");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !identity.is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a certificate from the live replica within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    shutdown.cancel();
    running.await.expect("discovery ends");
    certifying.abort();
    cp.shutdown().await;
}
