//! The `weft-proxy` binary's refusals of unsafe settings, before it starts anything.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// The admin endpoint has no authentication (`POST /drain` stops the proxy): an address off
/// loopback is refused, with exit code 1 and a message that says why.
#[test]
fn a_non_loopback_admin_address_is_refused() {
    for address in ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901"] {
        let out = Command::new(BIN)
            .args(["run", "--cp-address", "https://127.0.0.1:5678"])
            .args(["--ca-cert-file", "/nonexistent/ca.pem"])
            .args(["--dataplane-file", "/nonexistent/dp.yaml"])
            .args(["--dataplane-token-file", "/nonexistent/token"])
            .args(["--admin-address", address])
            .output()
            .expect("run weft-proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{address}: {stderr}");
        assert!(
            stderr.contains("not a loopback address"),
            "{address}: {stderr}"
        );
    }
}
