//! `weft-bench mesh --quick` end to end: every path that ran carried
//! traffic without errors, for each protocol (HTTP/1.1, h2c, gRPC, raw TCP
//! ping-pong) the direct path and, when weft ran, the weft path. No timing
//! assertions: the
//! figures depend on the machine. Needs root (network namespaces); skipped
//! visibly otherwise.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `--quick` promises under 60 s; leave room for a loaded CI machine.
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn quick_mesh_run_carries_traffic_on_every_path() {
    if !weft_tests::is_root() {
        eprintln!("SKIPPED quick_mesh_run_carries_traffic_on_every_path: needs root");
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-bench"))
        .args(["mesh", "--quick", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start weft-bench mesh");
    let pipe = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let stdout = pipe(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = pipe(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("weft-bench mesh --quick ran over {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    eprintln!("{stderr}");
    assert!(
        status.success(),
        "weft-bench mesh failed ({status}):\n{stderr}"
    );

    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    for note in report["notes"].as_array().expect("notes") {
        eprintln!("note: {}", note.as_str().unwrap_or_default());
    }
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0));
    let paths = report["paths"].as_array().expect("paths");
    assert_eq!(
        paths[0]["name"], "direct",
        "direct is always measured first"
    );
    let names: Vec<&str> = paths.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut expected = vec!["direct", "direct-h2", "direct-grpc", "direct-echo"];
    // weft is skipped (with a note) when its binaries are not beside
    // weft-bench; when it runs, it runs for every protocol (raw TCP in tcp
    // mode only).
    if names.contains(&"weft") {
        expected.extend(["weft-h2", "weft-grpc", "weft-echo-tcp"]);
    }
    for want in expected {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for p in paths {
        let name = p["name"].as_str().expect("name");
        // `-echo` names raw TCP; a trailing `-tcp` is the proxy mode.
        let protocol = if name.ends_with("-h2") {
            "h2"
        } else if name.ends_with("-grpc") {
            "grpc"
        } else if name.contains("-echo") {
            "tcp"
        } else {
            "http1"
        };
        if protocol == "tcp" && p["proxy_mode"] != "none" {
            assert_eq!(p["proxy_mode"], "tcp", "{name}: raw TCP in tcp mode only");
        }
        assert_eq!(p["protocol"], protocol, "{name}: protocol");
        let num = |key: &str| {
            p[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: {key} missing"))
        };
        assert!(num("requests") > 0.0, "{name} carried no requests");
        assert!(num("rps") > 0.0, "{name}: no throughput");
        assert!(num("latency_rps") > 0.0, "{name}: no latency run");
        assert!(num("p50_ms") > 0.0, "{name}: no latencies recorded");
        assert_eq!(p["errors"], 0, "{name} had errors: {}", p["errors_by_kind"]);
        assert!(
            num("rps_vs_direct") > 0.0,
            "{name}: no direct path of its protocol to compare with"
        );
        // Direct paths (`direct`, `direct-h2`, ...) have no sidecars.
        if p["proxy_mode"] != "none" {
            assert!(num("rss_idle_mib") > 0.0, "{name}: sidecar RSS not read");
            assert!(num("cpu_us_per_req") > 0.0, "{name}: sidecar CPU not read");
        }
        eprintln!(
            "{name}: {:.0} req/s, p50 {:.3} ms, {} errors",
            num("rps"),
            num("p50_ms"),
            p["errors"]
        );
    }
}
