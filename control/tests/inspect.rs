//! `weftctl inspect dataplanes` end to end: proxies report their traffic totals through
//! discovery — a fake proxy speaking raw gRPC, and weft-proxy's own discovery client with a
//! stub stats source — the control plane keeps the latest report per proxy, the REST API
//! shows it in `dataplanes+insights`, and the real `weftctl` binary prints it.

mod support;

use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::in_process::{control_plane, put};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use weft_api::proto::discovery_client::DiscoveryClient;
use weft_api::proto::discovery_request::Kind;
use weft_api::proto::{Ack, DiscoveryRequest, ProxyStats, Register};
use weft_control::run::ControlPlane;
use weft_proxy::discovery::Discovery;
use weft_proxy::identity::TokenSource;
use weft_proxy::metrics::Metrics;

fn dataplane(mesh: &str, name: &str, ip: &str) -> String {
    format!(
        "type: Dataplane\nmesh: {mesh}\nname: {name}\nnetworking:\n  address: {ip}\n  inbound:\n  - port: 8080\n    tags: {{kuma.io/service: {name}}}\n"
    )
}

fn token(cp: &ControlPlane, mesh: &str, name: &str) -> String {
    cp.identity
        .tokens()
        .issue(mesh, name, Duration::from_secs(3600))
        .expect("token")
        .token
}

async fn channel(cp: &ControlPlane) -> Channel {
    let ca = std::fs::read_to_string(cp.data_dir.join("cp-ca.pem")).expect("cp-ca.pem");
    Endpoint::from_shared(format!("https://{}", cp.dp_server_address))
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

/// `GET /meshes/{mesh}/dataplanes+insights`, items by dataplane name.
async fn insights(cp: &ControlPlane, mesh: &str) -> Vec<(String, Value)> {
    let url = format!(
        "http://{}/meshes/{mesh}/dataplanes+insights",
        cp.api_address
    );
    let body: Value = reqwest::get(url)
        .await
        .expect("insights")
        .json()
        .await
        .expect("json");
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_string(),
                i.clone(),
            )
        })
        .collect()
}

/// The reported stats of dataplane `name`, if it is listed yet.
fn find_stats<'a>(items: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    items
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, i)| &i["dataplaneInsight"]["stats"])
}

fn stats_of<'a>(items: &'a [(String, Value)], name: &str) -> &'a Value {
    find_stats(items, name).unwrap_or_else(|| panic!("no dataplane {name} in {items:?}"))
}

/// Runs `weftctl --api-url … args` off the runtime (the control plane runs on it).
async fn weftctl(cp: &ControlPlane, args: &[&str]) -> String {
    let url = format!("http://{}", cp.api_address);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::weftctl(&url, &args, None)
    })
    .await
    .expect("weftctl thread");
    assert_eq!(code, 0, "weftctl failed: {err}");
    out
}

/// The table's rows, cells split on whitespace, by dataplane name (the second column).
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn row<'a>(rows: &'a [Vec<String>], name: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r.get(1).map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in {rows:?}"))
}

#[tokio::test]
async fn reported_stats_reach_rest_and_weftctl_inspect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = control_plane(dir.path()).await;
    put(&cp, "type: Mesh\nname: payments\n");
    // Listed, never connected: offline, no report.
    put(&cp, &dataplane("default", "idle-1", "10.0.0.9"));

    // A fake proxy reports fixed totals over the raw protocol.
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Register(Register {
            dataplane: dataplane("default", "web-1", "10.0.0.1"),
            proxy_version: "test".into(),
            keeps_parts: vec![],
        })),
    })
    .await
    .expect("register");
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    let bearer = format!("Bearer {}", token(&cp, "default", "web-1"));
    req.metadata_mut()
        .insert("authorization", bearer.parse().expect("metadata"));
    let mut snapshots = DiscoveryClient::new(channel(&cp).await)
        .stream(req)
        .await
        .expect("web-1 registers")
        .into_inner();
    let first = snapshots
        .message()
        .await
        .expect("stream ok")
        .expect("a snapshot");
    let send = |kind| {
        let tx = tx.clone();
        async move {
            tx.send(DiscoveryRequest { kind: Some(kind) })
                .await
                .expect("send")
        }
    };
    send(Kind::Ack(Ack {
        version: first.version.clone(),
        nonce: first.nonce.clone(),
    }))
    .await;
    // A request kind this control plane does not know (from a newer proxy) is ignored: the
    // stream stays open and the report after it arrives.
    tx.send(DiscoveryRequest { kind: None })
        .await
        .expect("send");
    send(Kind::Stats(ProxyStats {
        requests_total: 400,
        request_errors_total: 3,
        connections_total: 12,
        connections_active: 2,
        bytes_sent: 1000,
        bytes_received: 2000,
    }))
    .await;

    // weft-proxy's discovery client reports what its source says, every 50 ms: here a total
    // that grows by 10 per report, so two reports are told apart.
    let reads = Arc::new(AtomicU64::new(0));
    let source = {
        let reads = reads.clone();
        move || {
            let n = reads.fetch_add(1, Ordering::Relaxed) + 1;
            ProxyStats {
                requests_total: 10 * n,
                connections_total: n,
                ..Default::default()
            }
        }
    };
    let client = Arc::new(
        Discovery::new(
            channel(&cp).await,
            dataplane("payments", "backend-1", "10.0.1.1"),
            TokenSource::Inline(token(&cp, "payments", "backend-1")),
            Arc::new(Metrics::new()),
        )
        .with_stats(Arc::new(source), Duration::from_millis(50)),
    );
    let stop = CancellationToken::new();
    let running = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move { client.run(Arc::new(|_| Ok(())), stop).await })
    };

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (default, payments) = loop {
        let default = insights(&cp, "default").await;
        let payments = insights(&cp, "payments").await;
        // backend-1 registers from its own task: it may not be listed on the first reads.
        let backend = find_stats(&payments, "backend-1").and_then(|s| s["requestsTotal"].as_u64());
        if stats_of(&default, "web-1")["requestsTotal"] == 400 && backend >= Some(20) {
            break (default, payments);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reports did not arrive: {default:?} {payments:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let web = stats_of(&default, "web-1");
    assert_eq!(web["requestErrorsTotal"], 3);
    assert_eq!(web["connectionsTotal"], 12);
    assert_eq!(web["connectionsActive"], 2);
    assert_eq!(
        (web["bytesSent"].clone(), web["bytesReceived"].clone()),
        (1000.into(), 2000.into())
    );
    assert!(
        web["reportedAt"].as_str().is_some_and(|t| !t.is_empty()),
        "{web}"
    );
    assert!(stats_of(&default, "idle-1").is_null());
    let backend = stats_of(&payments, "backend-1");
    assert_eq!(
        backend["requestsTotal"].as_u64().map(|r| r / 10),
        backend["connectionsTotal"].as_u64(),
        "one report, read at once: {backend}"
    );

    let table = weftctl(&cp, &["inspect", "dataplanes", "--mesh", "default"]).await;
    let default_rows = rows(&table);
    assert_eq!(
        default_rows[0],
        [
            "MESH",
            "NAME",
            "STATUS",
            "LAST-SEEN",
            "CONFIG",
            "CERT-EXPIRY",
            "REQUESTS",
            "ERROR-RATE",
            "CONNECTIONS"
        ],
        "{table}"
    );
    let web = row(&default_rows, "web-1");
    assert_eq!(&web[..3], ["default", "web-1", "Online"], "{table}");
    assert!(web[3].ends_with('s') && web[4] == "ago", "{table}");
    // The test proxy acknowledged its snapshot and asked for no certificate.
    assert_eq!(&web[5..], ["synced", "-", "400", "0.75%", "12"], "{table}");
    assert_eq!(
        row(&default_rows, "idle-1"),
        [
            "default", "idle-1", "Offline", "never", "-", "-", "-", "-", "-"
        ],
        "{table}"
    );
    assert!(
        default_rows.iter().all(|r| r[0] != "payments"),
        "--mesh shows one mesh: {table}"
    );

    let table = weftctl(&cp, &["inspect", "dataplanes"]).await;
    let all_rows = rows(&table);
    let backend = row(&all_rows, "backend-1");
    assert_eq!(
        &backend[..3],
        ["payments", "backend-1", "Online"],
        "{table}"
    );
    assert!(
        backend[7].parse::<u64>().is_ok_and(|r| r >= 20) && backend[8] == "0.00%",
        "{table}"
    );
    assert_eq!(all_rows.len(), 4, "header and three dataplanes: {table}");

    let json: Value = serde_json::from_str(
        &weftctl(
            &cp,
            &["inspect", "dataplanes", "--mesh", "default", "-o", "json"],
        )
        .await,
    )
    .expect("json output");
    assert_eq!(json["total"], 2, "{json}");
    let web = json["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["name"] == "web-1"))
        .expect("web-1 in json");
    assert_eq!(web["dataplaneInsight"]["stats"]["requestsTotal"], 400);
    assert_eq!(web["dataplaneInsight"]["online"], true);

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
    drop(tx);
    cp.shutdown().await;
}
