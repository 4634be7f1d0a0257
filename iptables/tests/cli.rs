//! The `weft-iptables` binary as users (and scripts) call it, without root: `--dry-run`
//! prints the `iptables-restore` input and touches nothing; bad input exits 1.
//!
//! Being an integration test of this package also makes `cargo test --workspace` build the
//! `weft-iptables` binary, which the end-to-end tests in `proxy/tests/mesh_e2e.rs` run
//! (cargo builds a package's binaries only for that package's own integration tests).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_weft-iptables");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run weft-iptables");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dry_run_prints_the_rules_it_would_install() {
    let (code, out, err) = run(&[
        "install",
        "--dry-run",
        "--proxy-uid",
        "4242",
        "--redirect-inbound-port",
        "16006",
        "--redirect-outbound-port",
        "16001",
        "--exclude-inbound-ports",
        "22",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("*nat") && out.trim_end().ends_with("COMMIT"),
        "{out}"
    );
    let rules: Vec<&str> = out.lines().filter(|l| l.starts_with("-A ")).collect();
    assert!(!rules.is_empty(), "{out}");
    for rule in &rules {
        assert!(
            rule.contains("--comment weft/transparent-proxy"),
            "a rule without weft's comment: {rule}"
        );
    }
    let has = |needle: &str| rules.iter().any(|r| r.contains(needle));
    assert!(has("-j REDIRECT --to-ports 16006"), "{out}");
    assert!(has("-j REDIRECT --to-ports 16001"), "{out}");
    assert!(
        has("--uid-owner 4242"),
        "the proxy's uid is not exempt: {out}"
    );
    assert!(
        has("--dport 22"),
        "the excluded inbound port is missing: {out}"
    );
    assert!(
        rules.iter().all(|r| !r.contains("--to-ports 15001")),
        "{out}"
    );
}

#[test]
fn bad_input_exits_1_and_says_why() {
    let (code, _, err) = run(&["install", "--dry-run", "--no-such-flag"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");
}
