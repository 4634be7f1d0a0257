//! The discovery client against a scripted control plane: snapshots that keep parts are
//! completed from the one applied last, and ACKed with the complete version.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weft_api::proto::{self as pb, SnapshotPart, SnapshotParts, discovery_request::Kind};
use weft_proxy::discovery::Discovery;
use weft_proxy::identity::TokenSource;
use weft_proxy::metrics::Metrics;

type Snapshots = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send>>;

/// Sends `script` one snapshot at a time, each after the proxy's reply to the one before,
/// and reports the Register and every reply.
struct Scripted {
    script: Vec<pb::Snapshot>,
    seen: mpsc::UnboundedSender<Kind>,
}

#[tonic::async_trait]
impl pb::discovery_server::Discovery for Scripted {
    type StreamStream = Snapshots;

    async fn stream(
        &self,
        req: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Snapshots>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let script = self.script.clone();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let mut script = script.into_iter();
            while let Some(Ok(m)) = inbound.next().await {
                let Some(kind) = m.kind else { continue };
                if matches!(kind, Kind::Stats(_)) {
                    continue;
                }
                let _ = seen.send(kind);
                let Some(next) = script.next() else { continue };
                if tx.send(Ok(next)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn parts(tag: &str) -> SnapshotParts {
    SnapshotParts {
        dataplane: "d1".into(),
        mesh: "m1".into(),
        inbounds: format!("i{tag}"),
        outbounds: "o1".into(),
        outbound_listeners: "l1".into(),
    }
}

fn complete(version: &str, source: &str) -> pb::Snapshot {
    pb::Snapshot {
        version: version.into(),
        nonce: format!("n-{version}"),
        dataplane: Some(pb::DataplaneIdentity {
            mesh: "default".into(),
            name: "backend-1".into(),
            address: "127.0.0.1".into(),
            ..Default::default()
        }),
        mesh: Some(pb::MeshSettings {
            name: "default".into(),
            ..Default::default()
        }),
        trust_bundle_pem: "PEM".into(),
        inbounds: vec![pb::InboundConfig {
            port: 8080,
            service: "backend".into(),
            permissions: vec![pb::PermissionRule {
                source_service: source.into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        outbounds: vec![pb::OutboundService {
            service: "backend".into(),
            endpoints: vec![pb::Endpoint {
                address: "127.0.0.1".into(),
                port: 8080,
                healthy: true,
                ..Default::default()
            }],
            ..Default::default()
        }],
        outbound_listeners: vec![],
        parts: Some(parts(version)),
        kept: vec![],
    }
}

/// `full` as the control plane sends it to a proxy that holds every part but the inbounds.
fn keeping_all_but_inbounds(full: &pb::Snapshot) -> pb::Snapshot {
    let kept = [
        SnapshotPart::Dataplane,
        SnapshotPart::Mesh,
        SnapshotPart::Outbounds,
        SnapshotPart::OutboundListeners,
    ];
    pb::Snapshot {
        version: full.version.clone(),
        nonce: full.nonce.clone(),
        inbounds: full.inbounds.clone(),
        parts: full.parts.clone(),
        kept: kept.iter().map(|p| *p as i32).collect(),
        ..Default::default()
    }
}

/// Serves `cp` on a loopback port; returns its address.
async fn serve<S: pb::discovery_server::Discovery>(cp: S) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::discovery_server::DiscoveryServer::new(cp))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    addr
}

/// A discovery client of dataplane `backend-1` for the control plane at `addr`.
fn client_of(addr: std::net::SocketAddr) -> Arc<Discovery> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_lazy();
    Arc::new(Discovery::new(
        channel,
        "type: Dataplane\nmesh: default\nname: backend-1\n".into(),
        TokenSource::Inline("token".into()),
        Arc::new(Metrics::new()),
    ))
}

async fn next(seen: &mut mpsc::UnboundedReceiver<Kind>) -> Kind {
    tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("a message within 5s")
        .expect("open")
}

#[tokio::test]
async fn kept_parts_are_filled_in_from_the_applied_snapshot() {
    let v1 = complete("1", "web");
    let v2 = complete("2", "billing");
    let mut stale = keeping_all_but_inbounds(&complete("3", "web"));
    stale.parts.as_mut().expect("parts").outbounds = "o-unknown".into();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let cp = Scripted {
        script: vec![v1.clone(), keeping_all_but_inbounds(&v2), stale.clone()],
        seen: seen_tx,
    };
    let discovery = client_of(serve(cp).await);
    let applied = discovery.applied();
    let shutdown = CancellationToken::new();
    let run = {
        let (d, s) = (discovery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run(Arc::new(|_: &pb::Snapshot| Ok(())), s).await })
    };

    let Kind::Register(register) = next(&mut seen).await else {
        panic!("Register first")
    };
    assert_eq!(register.keeps_parts.len(), weft_api::parts::ALL.len());
    let Kind::Ack(ack) = next(&mut seen).await else {
        panic!("v1 ACKed")
    };
    assert_eq!((ack.version.as_str(), ack.nonce.as_str()), ("1", "n-1"));
    let Kind::Ack(ack) = next(&mut seen).await else {
        panic!("v2 ACKed")
    };
    assert_eq!(ack.version, "2");
    assert_eq!(
        applied.borrow().as_deref(),
        Some(&v2),
        "the applied snapshot is the complete one"
    );
    let Kind::Nack(nack) = next(&mut seen).await else {
        panic!("a snapshot keeping outbounds the proxy does not have is refused")
    };
    assert_eq!(nack.version, "3");
    assert!(
        nack.reason.contains("SNAPSHOT_PART_OUTBOUNDS"),
        "{}",
        nack.reason
    );
    assert_eq!(applied.borrow().as_deref(), Some(&v2), "v2 stays applied");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
}

/// Refuses the first `refusals` streams at once; then takes one, sends it one snapshot, and
/// breaks it 50 ms later. Records when each stream was asked for.
struct Flaky {
    refusals: usize,
    attempts: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    snapshot: pb::Snapshot,
}

#[tonic::async_trait]
impl pb::discovery_server::Discovery for Flaky {
    type StreamStream = Snapshots;

    async fn stream(
        &self,
        _req: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Snapshots>, Status> {
        let attempt = {
            let mut attempts = self.attempts.lock().expect("attempts");
            attempts.push(std::time::Instant::now());
            attempts.len()
        };
        if attempt <= self.refusals {
            return Err(Status::unavailable("not yet"));
        }
        let (tx, rx) = mpsc::channel(2);
        let snapshot = self.snapshot.clone();
        tokio::spawn(async move {
            let _ = tx.send(Ok(snapshot)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err(Status::internal("broken"))).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The reconnect backoff grows over failed attempts, and starts over after a stream that was
/// up: when that stream breaks, the next attempt comes after the first step (at most 200 ms),
/// not after the long delay the earlier failures had reached (800 ms or more after four).
#[tokio::test]
async fn the_backoff_starts_over_after_a_stream_that_was_up() {
    const REFUSALS: usize = 4;
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let cp = Flaky {
        refusals: REFUSALS,
        attempts: attempts.clone(),
        snapshot: complete("1", "web"),
    };
    let discovery = client_of(serve(cp).await);
    let shutdown = CancellationToken::new();
    let run = {
        let (d, s) = (discovery.clone(), shutdown.clone());
        tokio::spawn(async move { d.run(Arc::new(|_: &pb::Snapshot| Ok(())), s).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while attempts.lock().expect("attempts").len() < REFUSALS + 2 {
        assert!(tokio::time::Instant::now() < deadline, "too few attempts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
    let at = attempts.lock().expect("attempts").clone();
    let before_up = at[REFUSALS] - at[REFUSALS - 1];
    // The stream that was up lived about 50 ms before it broke.
    let after_up = at[REFUSALS + 1] - at[REFUSALS];
    assert!(
        before_up >= Duration::from_millis(800),
        "the backoff did not grow: {before_up:?}"
    );
    assert!(
        after_up < Duration::from_millis(600),
        "the backoff did not start over: {after_up:?} (before: {before_up:?})"
    );
}
