//! Mutations through the REST API are accepted only from loopback, unless the caller
//! presents the admin token. Runs the control plane in a network namespace and calls it from
//! a second namespace over a veth link (needs root; skipped visibly otherwise).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};
use weft_tests::{Host, Net, require_root};

/// One HTTP/1.1 request over a plain socket; returns the status code.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {resp}")))
}

fn start_cp(host: &Host, dir: &std::path::Path, extra: &[&str]) -> weft_tests::Proc {
    let mut cmd = Command::new(support::WEFT_CONTROL);
    cmd.args(["run", "--api-address", "0.0.0.0:5681", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("WEFT_LOG", "warn");
    let proc = host.spawn(cmd).expect("spawn weft-control");
    let addr: SocketAddr = "127.0.0.1:5681".parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host
        .enter(move || http(addr, "GET", "/", "", None).is_ok())
        .expect("enter")
    {
        assert!(Instant::now() < deadline, "control plane did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

const MESH: &str = r#"{"type":"Mesh","name":"remote"}"#;

#[test]
fn non_loopback_mutation_is_refused() {
    require_root!();
    let net = Net::new().expect("net");
    let cp_host = net.host("cp").expect("host");
    let other = net.host("other").expect("host");
    net.link(&cp_host, &other).expect("link");
    let api = SocketAddr::new(cp_host.ip().into(), 5681);
    let dir = tempfile::tempdir().expect("tempdir");
    let _cp = start_cp(&cp_host, dir.path(), &[]);

    // From another host: reads work, writes are refused.
    assert_eq!(
        other
            .enter(move || http(api, "GET", "/meshes", "", None))
            .expect("enter")
            .expect("get"),
        200
    );
    assert_eq!(
        other
            .enter(move || http(api, "PUT", "/meshes/remote", MESH, None))
            .expect("enter")
            .expect("put"),
        403
    );
    assert_eq!(
        other
            .enter(move || http(api, "DELETE", "/meshes/default", "", None))
            .expect("enter")
            .expect("delete"),
        403
    );
    // Not even a token helps when none is configured.
    assert_eq!(
        other
            .enter(move || http(api, "PUT", "/meshes/remote", MESH, Some("guess")))
            .expect("enter")
            .expect("put"),
        403
    );
    // The same write from loopback on the control plane's host is accepted.
    let local: SocketAddr = "127.0.0.1:5681".parse().expect("addr");
    assert_eq!(
        cp_host
            .enter(move || http(local, "PUT", "/meshes/remote", MESH, None))
            .expect("enter")
            .expect("put"),
        201
    );
}

#[test]
fn admin_token_allows_remote_mutation() {
    require_root!();
    let net = Net::new().expect("net");
    let cp_host = net.host("cp").expect("host");
    let other = net.host("other").expect("host");
    net.link(&cp_host, &other).expect("link");
    let api = SocketAddr::new(cp_host.ip().into(), 5681);
    let dir = tempfile::tempdir().expect("tempdir");
    let _cp = start_cp(&cp_host, dir.path(), &["--admin-token", "s3cret"]);

    assert_eq!(
        other
            .enter(move || http(api, "PUT", "/meshes/remote", MESH, Some("wrong")))
            .expect("enter")
            .expect("put"),
        403
    );
    assert_eq!(
        other
            .enter(move || http(api, "PUT", "/meshes/remote", MESH, Some("s3cret")))
            .expect("enter")
            .expect("put"),
        201
    );
}
