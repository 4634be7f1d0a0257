//! Smoke test of the discovery benchmark: 20 simulated proxies against an in-process control
//! plane, two rounds. No timing assertions: it checks that every proxy registers, converges
//! and ACKs every round's policy.

use std::time::Duration;

use weft_bench::discovery::{self, Config, control::Target};
use weft_control::run::{RunConfig, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_proxies_see_every_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(RunConfig {
        data_dir: dir.path().to_path_buf(),
        store_url: None,
        api_address: "127.0.0.1:0".parse().expect("addr"),
        dp_server_address: "127.0.0.1:0".parse().expect("addr"),
        dp_server_sans: vec![],
        dp_server_cert: None,
        no_default_mesh: true,
        admin_token: None,
        dp_keepalive: weft_control::run::DEFAULT_DP_KEEPALIVE,
    })
    .await
    .expect("control plane starts");
    let target = Target {
        api: cp.api_address,
        dp: cp.dp_server_address,
        ca_pem: std::fs::read_to_string(dir.path().join("cp-ca.pem")).expect("cp-ca.pem"),
        pid: None,
    };
    let cfg = Config {
        proxies: 20,
        services: 4,
        // Several connections, one partly filled.
        streams_per_connection: 8,
        register_concurrency: 5,
        rounds: 2,
        pause: Duration::from_millis(100),
        timeout: Duration::from_secs(20),
        progress: false,
        keep_parts: true,
    };
    let report = discovery::run(&cfg, &target).await.expect("benchmark runs");
    assert_eq!(report.proxies, 20);
    assert_eq!(report.connections, 3);
    assert_eq!(report.rounds.len(), 2);
    for r in &report.rounds {
        assert!(r.pushes >= 20, "round {}: {} pushes", r.round, r.pushes);
        assert!(r.max_ms >= r.p50_ms);
        // Only the inbounds changed: the proxies kept the rest.
        let complete_kib = (r.pushes * report.snapshot_bytes) as f64 / 1024.0;
        assert!(
            r.pushed_kib < complete_kib / 2.0,
            "round {}: {} KiB pushed, {complete_kib} KiB complete",
            r.round,
            r.pushed_kib
        );
    }
    assert!(report.snapshot_bytes > 0);
    assert!(report.cp_rss_idle_mib.is_none(), "no process to measure");
    let json = serde_json::to_value(&report).expect("json");
    for key in ["p50_ms", "p99_ms", "registration_s", "rounds"] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert!(report.to_text().contains("round"));
    cp.shutdown().await;
}
