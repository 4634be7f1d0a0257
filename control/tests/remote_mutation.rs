//! Mutations through the REST API are accepted only from loopback, unless the caller
//! presents the admin token; so is reading a provided CA's private key. Runs the control plane in a network namespace and calls it from
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
    http_full(addr, method, path, body, token).map(|(status, _)| status)
}

/// One HTTP/1.1 request over a plain socket; returns the status code and the whole response.
fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
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
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {resp}")))?;
    Ok((status, resp))
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

/// A control plane on a host of its own (its API on every address, port 5681, with `extra`
/// flags) and a second host linked to it; the API's address as the second host sees it.
/// Everything goes with the returned guards.
struct Remote {
    _net: Net,
    cp_host: Host,
    other: Host,
    api: SocketAddr,
    _dir: tempfile::TempDir,
    _cp: weft_tests::Proc,
}

impl Remote {
    fn start(extra: &[&str]) -> Remote {
        let net = Net::new().expect("net");
        let cp_host = net.host("cp").expect("host");
        let other = net.host("other").expect("host");
        net.link(&cp_host, &other).expect("link");
        let api = SocketAddr::new(cp_host.ip().into(), 5681);
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = start_cp(&cp_host, dir.path(), extra);
        Remote {
            _net: net,
            cp_host,
            other,
            api,
            _dir: dir,
            _cp: cp,
        }
    }
}

const MESH: &str = r#"{"type":"Mesh","name":"remote"}"#;

#[test]
fn non_loopback_mutation_is_refused() {
    require_root!();
    let remote = Remote::start(&[]);
    let (cp_host, other, api) = (&remote.cp_host, &remote.other, remote.api);

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
    let remote = Remote::start(&["--admin-token", "s3cret-admin-token-42"]);
    let (other, api) = (&remote.other, remote.api);

    assert_eq!(
        other
            .enter(move || http(api, "PUT", "/meshes/remote", MESH, Some("wrong")))
            .expect("enter")
            .expect("put"),
        403
    );
    assert_eq!(
        other
            .enter(move || http(
                api,
                "PUT",
                "/meshes/remote",
                MESH,
                Some("s3cret-admin-token-42")
            ))
            .expect("enter")
            .expect("put"),
        201
    );
}

/// A provided CA's private key is read back only by a trusted caller (loopback, or the admin
/// token): anyone else reading the Mesh gets the rest of it, with the key redacted.
#[test]
fn a_provided_ca_key_is_read_only_by_trusted_callers() {
    require_root!();
    let remote = Remote::start(&["--admin-token", "s3cret-admin-token-42"]);
    let (cp_host, other, api) = (&remote.cp_host, &remote.other, remote.api);

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).expect("a CA");
    let mesh = serde_json::json!({
        "type": "Mesh",
        "name": "secure",
        "mtls": {
            "enabledBackend": "ca-1",
            "backends": [{
                "name": "ca-1",
                "type": "provided",
                "conf": {
                    "cert": {"inlineString": cert.pem()},
                    "key": {"inlineString": key.serialize_pem()},
                },
            }],
        },
    })
    .to_string();
    let local: SocketAddr = "127.0.0.1:5681".parse().expect("addr");
    let put = cp_host
        .enter(move || http_full(local, "PUT", "/meshes/secure", &mesh, None))
        .expect("enter")
        .expect("put");
    assert_eq!(put.0, 201, "{}", put.1);

    // The key's base64 body, as it appears (JSON-escaped newlines aside) in a response.
    let pem = key.serialize_pem();
    let secret = pem.lines().nth(1).expect("a PEM body line").to_string();
    for (path, what) in [("/meshes/secure", "the mesh"), ("/meshes", "the mesh list")] {
        let (status, body) = other
            .enter(move || http_full(api, "GET", path, "", None))
            .expect("enter")
            .expect("get");
        assert_eq!(status, 200, "{body}");
        assert!(
            !body.contains(&secret),
            "{what} showed the key to a remote reader"
        );
        assert!(body.contains("redacted"), "{what}: {body}");
        assert!(
            body.contains("BEGIN CERTIFICATE"),
            "{what} keeps the certificate"
        );
        let (status, body) = other
            .enter(move || http_full(api, "GET", path, "", Some("s3cret-admin-token-42")))
            .expect("enter")
            .expect("get");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&secret), "{what} with the admin token");
        let (status, body) = cp_host
            .enter(move || http_full(local, "GET", path, "", None))
            .expect("enter")
            .expect("get");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&secret), "{what} from loopback");
    }
}

/// An empty or short admin token is refused at start (an unset variable in a deployment
/// template gives an empty one, and over HTTP/2 `Authorization: Bearer ` presented it): the
/// control plane does not start open to every remote caller.
#[test]
fn an_empty_or_short_admin_token_is_refused_at_start() {
    for token in ["", "short", "has a space in it!"] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = Command::new(support::WEFT_CONTROL)
            .args(["run", "--api-address", "127.0.0.1:0"])
            .args(["--dp-server-address", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("WEFT_ADMIN_TOKEN", token)
            .env("WEFT_LOG", "warn")
            .output()
            .expect("run weft-control");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "token {token:?}: {err}");
        assert!(
            err.contains("--admin-token must be at least 16 characters"),
            "token {token:?}: {err}"
        );
    }
}
