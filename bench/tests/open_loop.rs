//! Open loop against a known upstream: the schedule holds, and a slow
//! server shows up in the corrected latency.

mod common;

use std::sync::Arc;
use std::time::Duration;

use weft_bench::http::Version;
use weft_bench::load::{self, LoadConfig, Stop};

#[test]
fn achieved_rate_is_within_2_percent_of_target() {
    let server = common::server(Duration::ZERO);
    let client = common::http_client(&server, Version::Http1);
    let target = 2000.0;
    let cfg = LoadConfig {
        connections: 8,
        rate: Some(target),
        warmup: Duration::from_millis(500),
        stop: Stop::Duration(Duration::from_secs(5)),
        threads: 1,
        ..LoadConfig::default()
    };
    let m = load::run(Arc::new(client), &cfg).unwrap();
    let rps = m.rps();
    eprintln!("target {target} req/s, achieved {rps:.1} req/s");
    assert_eq!(m.recorder.errors.total(), 0, "{:?}", m.recorder.errors);
    assert!(
        (rps - target).abs() <= 0.02 * target,
        "achieved {rps:.1} req/s for a target of {target}"
    );
}

#[test]
fn delayed_server_shows_in_corrected_latency() {
    let delay = Duration::from_millis(20);
    let server = common::server(delay);
    let client = common::http_client(&server, Version::Http1);
    // Two connections at 200 req/s: each must send every 10 ms but a
    // response takes 20 ms, so requests queue behind slow responses; the
    // corrected latency counts from each request's intended send time.
    let cfg = LoadConfig {
        connections: 2,
        rate: Some(200.0),
        stop: Stop::Duration(Duration::from_secs(1)),
        threads: 1,
        ..LoadConfig::default()
    };
    let m = load::run(Arc::new(client), &cfg).unwrap();
    assert_eq!(m.recorder.errors.total(), 0, "{:?}", m.recorder.errors);
    let p50 = m.recorder.latency.value_at_quantile(0.5);
    eprintln!(
        "server delay {delay:?}, corrected p50 {:.3} ms",
        p50 as f64 / 1e6
    );
    assert!(
        p50 >= delay.as_nanos() as u64,
        "p50 {p50} ns is below the server's delay"
    );
}
