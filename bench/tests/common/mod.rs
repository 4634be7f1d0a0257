//! Shared helpers for the integration tests: an in-process `serve` on
//! 127.0.0.1 with free ports.
#![allow(dead_code)]

use std::time::Duration;

use weft_bench::serve::{ServeConfig, Server};
use weft_bench::{http, target};

/// Starts every upstream app on 127.0.0.1 with free ports.
pub fn server(delay: Duration) -> Server {
    let any = "127.0.0.1:0".parse().unwrap();
    Server::start(&ServeConfig {
        http: vec![any],
        grpc: vec![any],
        tcp: vec![any],
        body_size: 1024,
        delay,
        threads: 1,
        ..ServeConfig::default()
    })
    .unwrap()
}

/// An HTTP client for the server's HTTP listener.
pub fn http_client(server: &Server, version: http::Version) -> http::HttpClient {
    let url = format!("http://{}/", server.http_addrs()[0]);
    rt().block_on(http::HttpClient::new(&url, version)).unwrap()
}

/// Resolves through the library, to exercise it too.
pub fn resolve(addr: &str) -> std::net::SocketAddr {
    rt().block_on(target::resolve_authority(addr)).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
