//! Closed loop over every protocol against the in-process upstream: each
//! carries traffic with zero errors.

mod common;

use std::sync::Arc;
use std::time::Duration;

use weft_bench::load::{self, Client, LoadConfig, Measurement, Stop};
use weft_bench::{grpc, http, tcp};

const REQUESTS: u64 = 2000;

fn closed_loop<C: Client>(client: C) -> Measurement {
    let cfg = LoadConfig {
        connections: 4,
        threads: 2,
        warmup: Duration::from_millis(100),
        stop: Stop::Requests(REQUESTS),
        timeout: Duration::from_secs(5),
        ..LoadConfig::default()
    };
    load::run(Arc::new(client), &cfg).unwrap()
}

fn assert_clean(m: &Measurement) {
    assert_eq!(m.recorder.errors.total(), 0, "{:?}", m.recorder.errors);
    assert_eq!(m.recorder.ok, REQUESTS);
    assert_eq!(m.recorder.latency.len(), REQUESTS);
}

#[test]
fn http1() {
    let server = common::server(Duration::ZERO);
    assert_clean(&closed_loop(common::http_client(
        &server,
        http::Version::Http1,
    )));
}

#[test]
fn h2() {
    let server = common::server(Duration::ZERO);
    assert_clean(&closed_loop(common::http_client(
        &server,
        http::Version::H2,
    )));
}

#[test]
fn grpc_unary() {
    let server = common::server(Duration::ZERO);
    let addr = common::resolve(&server.grpc_addrs()[0].to_string());
    assert_clean(&closed_loop(grpc::GrpcClient::new(addr, 128, 512)));
}

#[test]
fn tcp_ping_pong() {
    let server = common::server(Duration::ZERO);
    assert_clean(&closed_loop(tcp::PingPongClient::new(
        server.tcp_addrs()[0],
        256,
    )));
}

#[test]
fn tcp_stream() {
    let server = common::server(Duration::ZERO);
    let m = tcp::stream(&tcp::StreamConfig {
        addr: server.tcp_addrs()[0],
        connections: 2,
        chunk: 16 * 1024,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(300),
        threads: 1,
        cpus: Vec::new(),
        progress: false,
    })
    .unwrap();
    assert_eq!(m.recorder.errors.total(), 0, "{:?}", m.recorder.errors);
    assert!(m.recorder.bytes > 0);
}

#[test]
fn dead_target_counts_connect_errors() {
    // Nothing listens on this port once the listener is dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = LoadConfig {
        connections: 1,
        stop: Stop::Requests(3),
        ..LoadConfig::default()
    };
    let m = load::run(Arc::new(tcp::PingPongClient::new(port, 8)), &cfg).unwrap();
    assert_eq!(m.recorder.errors.connect, 3);
    assert_eq!(m.recorder.ok, 0);
}
