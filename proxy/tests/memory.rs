//! Memory held by idle connections through a pair of sidecars (mTLS on). Ignored by default:
//! `cargo test -p weft-proxy --release --test memory -- --ignored --nocapture`.
//! `WEFT_IDLE_CONNS` sets the number of connections; `WEFT_IDLE_EXIT=1` exits while they are
//! still open, so that under `heaptrack` the "leaked" report is what idle connections hold.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_api::proto::mtls::Mode;
use weft_proxy::datapath_metrics::DataPathMetrics;
use weft_proxy::drain::Drain;
use weft_proxy::{DataPath, DataPathOptions, ProxyConfig};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// An echo app that holds no buffer while a connection is idle.
async fn lean_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut s = s;
                loop {
                    if s.readable().await.is_err() {
                        return;
                    }
                    let mut b = [0u8; 64];
                    match s.try_read(&mut b) {
                        Ok(0) => return,
                        Ok(n) => {
                            if s.write_all(&b[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn idle_connections_memory() {
    let n: usize = std::env::var("WEFT_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500);
    let mtls = match std::env::var("WEFT_IDLE_MTLS").as_deref() {
        Ok("0") => None,
        _ => Some(Mode::Strict),
    };
    let ca = TestCa::new("default");
    let app = lean_echo().await;
    let (inbound_port, outbound_port) = (free_port(), free_port());
    let server_snap = snapshot(
        Some(&ca),
        mesh_settings("default", mtls, true),
        "echo-1",
        vec![inbound(inbound_port, "echo", app, vec![allow("*")])],
        vec![service("echo", &[inbound_port])],
        vec![],
    );
    let client_snap = snapshot(
        Some(&ca),
        mesh_settings("default", mtls, true),
        "web-1",
        vec![],
        vec![service("echo", &[inbound_port])],
        vec![(outbound_port, "echo")],
    );
    let opts = DataPathOptions::default();
    let start = |snap, tls: Arc<TestMeshTls>| {
        DataPath::start(
            ProxyConfig::from_snapshot(snap).unwrap(),
            tls,
            DataPathMetrics::new(),
            Drain::new(),
            opts.clone(),
        )
        .unwrap()
    };
    let _server = start(&server_snap, TestMeshTls::new(&ca, &["echo"]));
    let _client = start(&client_snap, TestMeshTls::new(&ca, &["web"]));
    let out = SocketAddr::from(([127, 0, 0, 1], outbound_port));

    // Warm up (allocator arenas, TLS configs), then measure.
    let mut conns = Vec::new();
    for _ in 0..50 {
        conns.push(open(out).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib();
    for _ in 0..n {
        conns.push(open(out).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    let per_conn = (after - before) as f64 * 1024.0 / n as f64;
    println!(
        "{n} idle connections through both sidecars (+ client and app sockets): \
         RSS {before} KiB -> {after} KiB, {per_conn:.0} B per connection, \
         {:.1} MiB per 10k",
        per_conn * 10_000.0 / 1048576.0
    );
    if std::env::var_os("WEFT_IDLE_EXIT").is_some() {
        std::process::exit(0);
    }
}

async fn open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Not a possible HTTP start: detection decides at once.
    s.write_all(b"\0").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    s
}
