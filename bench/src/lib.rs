//! weft-bench: the load generator behind `weft-bench`, and the side-by-side
//! mesh benchmark of SPEC §8.
//!
//! # How the pieces fit
//! - [`load`] is the engine. It owns threads, connections, the closed and
//!   open loop, warm-up and coordinated-omission correction. It knows nothing
//!   about protocols: it drives anything that implements [`load::Client`]
//!   (open a connection; make one request on it).
//! - [`http`], [`grpc`] and [`tcp`] are the clients: HTTP/1.1 and h2c over
//!   hyper, gRPC unary echo over tonic, TCP ping-pong. [`tcp::stream`] is the
//!   one mode outside the engine: bulk echo throughput has no requests.
//! - [`stats`] holds what a run counts (HDR histograms, errors by kind, live
//!   counters); [`progress`] draws the once-a-second line from those
//!   counters; [`report`] turns a [`load::Measurement`] into text or the
//!   `--json` object, and defines the `mesh --json` schema that single runs
//!   are designed to slot into.
//! - [`serve`] runs the upstream apps (HTTP/1.1 + h2c, gRPC echo of every
//!   call kind, TCP echo), in-process for tests or as `weft-bench serve`.
//! - [`mesh`] is `weft-bench mesh`: network namespaces, the sidecar pairs
//!   (weft, HAProxy, nginx), `/proc` accounting, rounds and medians; it
//!   drives [`load`] in-process from inside the client namespace.
//! - [`discovery`] is the control-plane benchmark: simulated proxies on
//!   discovery streams against a `weft-control` process, apply → ACK latency
//!   and the control plane's RSS.
//! - [`duration`], [`cpu`] and [`target`] are small helpers: `5s`-style
//!   durations, CPU lists and pinning, address resolution.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use weft_bench::{http, load, report, serve};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = serve::Server::start(&serve::ServeConfig {
//!     http: vec!["127.0.0.1:0".parse()?],
//!     body_size: 1024,
//!     threads: 1,
//!     ..Default::default()
//! })?;
//! let url = format!("http://{}/", server.http_addrs()[0]);
//! let client = http::HttpClient::new(&url, http::Version::Http1).await?;
//! let cfg = load::LoadConfig {
//!     connections: 16,
//!     rate: Some(1000.0),
//!     stop: load::Stop::Duration(Duration::from_secs(5)),
//!     ..Default::default()
//! };
//! let m = tokio::task::spawn_blocking(move || load::run(Arc::new(client), &cfg)).await??;
//! let s = report::Summary::new(url, report::Protocol::Http1, report::Mode::Open, 16, Some(1000.0), &m);
//! println!("{}", s.to_text());
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cpu;
pub mod discovery;
pub mod duration;
pub mod grpc;
pub mod http;
pub mod load;
pub mod mesh;
pub mod progress;
pub mod report;
pub mod serve;
pub mod stats;
pub mod target;
pub mod tcp;
