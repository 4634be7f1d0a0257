//! End to end: with `weft-iptables ebpf install` attached to a cgroup and the network
//! namespace registered with `weft-iptables ebpf transparent`, an app's outbound TCP
//! connection goes straight to the proxy's outbound port on 127.0.0.1 when it connects, and
//! the proxy's `SO_ORIGINAL_DST` names where the app was going; the same connections as the
//! iptables rules of `install` are left alone (the proxy's uid, loopback and local
//! addresses, excluded ports and networks), and `--remove` takes the namespace out.
//!
//! Two namespaces on a veth pair: `app` (registered; a listener on 15001 stands for the
//! proxy) and `remote`, whose listener on the same ports stands for the destination. Where
//! a connection lands shows whether it was sent to the proxy. No iptables rules are
//! installed here, so nothing else can have redirected it.
//!
//! The programs are attached to a cgroup of the test's own and pinned in a bpf filesystem it
//! mounts; guards undo both, also when the test fails. The test is alone in this binary
//! because the whole process moves into that cgroup. Needs root, clang at build time and
//! bpftool (`.ci/run` installs both).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use socket2::SockRef;
use weft_iptables::ebpf::{self, EbpfConfig};
use weft_tests::cgroup::{Mount, TestCgroup};
use weft_tests::{Host, Net, require_root};

const BIN: &str = env!("CARGO_BIN_EXE_weft-iptables");
const PROXY_UID: u32 = 5678;
const OUTBOUND_PORT: u16 = 15001;
const SERVICE_PORT: u16 = 80;
const EXCLUDED_PORT: u16 = 81;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Uninstalls on drop.
struct Installed(EbpfConfig);

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = ebpf::uninstall(&self.0);
    }
}

/// Runs `weft-iptables ebpf <args>` for `cfg` inside `host`.
fn ebpf_output(host: &Host, cfg: &EbpfConfig, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("ebpf")
        .args(args)
        .args(["--name", &cfg.name])
        .arg("--cgroup-path")
        .arg(&cfg.cgroup)
        .arg("--bpffs-path")
        .arg(&cfg.bpffs);
    host.output(cmd, TIMEOUT).unwrap()
}

/// `weft-iptables ebpf <args>` for `cfg`, run inside `host`; its stdout.
fn weft_iptables_ebpf(host: &Host, cfg: &EbpfConfig, args: &[&str]) -> String {
    let out = ebpf_output(host, cfg, args);
    assert!(
        out.status.success(),
        "ebpf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Registers `host` with the test's proxy uid, outbound `port` and `extra` flags.
fn register(host: &Host, cfg: &EbpfConfig, port: u16, extra: &[&str]) {
    let (uid, port) = (PROXY_UID.to_string(), port.to_string());
    let mut args = vec![
        "transparent",
        "--proxy-uid",
        &uid,
        "--redirect-outbound-port",
        &port,
    ];
    args.extend_from_slice(extra);
    weft_iptables_ebpf(host, cfg, &args);
    let shown = weft_iptables_ebpf(host, cfg, &["show"]);
    assert!(
        shown.contains("this network namespace is registered"),
        "ebpf show after registering: {shown}"
    );
}

/// Connects from inside `host` (as this process: root) to `to`. The app sees `to` as its
/// peer either way; when the connection reached the proxy instead, the destination the
/// proxy's accepted socket reads from `SO_ORIGINAL_DST` (bytes are checked both ways).
fn connect(host: &Host, proxy: &TcpListener, to: SocketAddrV4) -> Option<SocketAddrV4> {
    host.enter(|| {
        let mut app = TcpStream::connect_timeout(&to.into(), TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
        assert_eq!(
            app.peer_addr().unwrap(),
            SocketAddr::V4(to),
            "the app's peer"
        );
        let mut accepted = accept_within(proxy, Duration::from_millis(300))?;
        accepted.set_nonblocking(false).unwrap();
        accepted.set_read_timeout(Some(TIMEOUT)).unwrap();
        app.set_read_timeout(Some(TIMEOUT)).unwrap();
        let orig = SockRef::from(&accepted)
            .original_dst_v4()
            .unwrap_or_else(|e| panic!("SO_ORIGINAL_DST of the connection to {to}: {e}"));
        app.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        accepted.write_all(b"pong").unwrap();
        app.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        orig.as_socket_ipv4()
    })
    .unwrap()
}

/// The next connection on the non-blocking `listener`, if one comes within `wait`.
fn accept_within(listener: &TcpListener, wait: Duration) -> Option<TcpStream> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((conn, _)) => return Some(conn),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Whether a connection is waiting on the non-blocking `listener`; accepts it.
fn took_one(listener: &TcpListener) -> bool {
    match listener.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept: {e}"),
    }
}

#[test]
fn registered_namespaces_connect_to_the_proxy_and_keep_the_original_destination() {
    require_root!();
    assert!(
        ebpf::available(),
        "weft-iptables was built without its eBPF programs: install clang and libbpf-dev"
    );
    // A mount of its own shows the host's one cgroup2 hierarchy, mounted or not.
    let cgroup2 = Mount::new("cgroup2", "none").unwrap();
    let bpffs = Mount::new("bpf", "bpf").unwrap();
    let net = Net::new().unwrap();
    let (app, remote) = (net.host("app").unwrap(), net.host("remote").unwrap());
    let _link = net.link(&app, &remote).unwrap();
    let (app_ip, remote_ip) = (app.ip(), remote.ip());
    let cgroup = TestCgroup::enter(cgroup2.path(), "weft-ebpf-connect-test").unwrap();
    let cfg = EbpfConfig {
        name: "connect-test".into(),
        ..EbpfConfig::new(cgroup.path(), bpffs.path())
    };
    // Registering needs the programs.
    let out = ebpf_output(&app, &cfg, &["transparent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("run `weft-iptables ebpf install`"), "{err}");
    let _installed = Installed(cfg.clone());
    weft_iptables_ebpf(&app, &cfg, &["install"]);

    let listen = |host: &Host, ip: Ipv4Addr, port: u16| {
        let l = host
            .enter(|| TcpListener::bind((ip, port)))
            .unwrap()
            .unwrap();
        l.set_nonblocking(true).unwrap();
        l
    };
    let proxy = listen(&app, Ipv4Addr::UNSPECIFIED, OUTBOUND_PORT);
    let remote_service = listen(&remote, remote_ip, SERVICE_PORT);
    let remote_excluded = listen(&remote, remote_ip, EXCLUDED_PORT);
    let local_service = listen(&app, app_ip, SERVICE_PORT);
    let loopback_service = listen(&app, Ipv4Addr::LOCALHOST, SERVICE_PORT);
    let service = SocketAddrV4::new(remote_ip, SERVICE_PORT);

    // Not registered yet: nothing changes.
    let shown = weft_iptables_ebpf(&app, &cfg, &["show"]);
    assert!(
        shown.contains("this network namespace is not registered"),
        "{shown}"
    );
    assert_eq!(connect(&app, &proxy, service), None);
    assert!(took_one(&remote_service));

    register(
        &app,
        &cfg,
        OUTBOUND_PORT,
        &["--exclude-outbound-ports", &EXCLUDED_PORT.to_string()],
    );
    // An outbound connection is the proxy's, with the app's destination.
    assert_eq!(connect(&app, &proxy, service), Some(service));
    assert!(
        !took_one(&remote_service),
        "the remote service saw the proxy's connection"
    );
    // Excluded ports, the namespace's own addresses and loopback stay direct.
    let excluded = SocketAddrV4::new(remote_ip, EXCLUDED_PORT);
    assert_eq!(connect(&app, &proxy, excluded), None);
    assert!(took_one(&remote_excluded));
    let local = SocketAddrV4::new(app_ip, SERVICE_PORT);
    assert_eq!(connect(&app, &proxy, local), None);
    assert!(took_one(&local_service));
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, SERVICE_PORT);
    assert_eq!(connect(&app, &proxy, loopback), None);
    assert!(took_one(&loopback_service));

    // The proxy's own connections are never sent back to it (bash's /dev/tcp, run as the
    // proxy's uid, connects and exits).
    let mut as_proxy = Command::new("bash");
    as_proxy
        .arg("-c")
        .arg(format!("exec 3<>/dev/tcp/{remote_ip}/{SERVICE_PORT}"))
        .uid(PROXY_UID)
        .gid(PROXY_UID);
    let out = app.output(as_proxy, TIMEOUT).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        took_one(&remote_service),
        "the proxy's uid reaches the remote service itself"
    );
    assert!(!took_one(&proxy), "the proxy's uid was sent to itself");

    // Registering again replaces the settings: an excluded network stays direct, and the
    // port excluded before is not any more (an address the app host has no route to: the
    // connection is made to the proxy, not there).
    register(
        &app,
        &cfg,
        OUTBOUND_PORT,
        &["--exclude-outbound-ips", &format!("{remote_ip}/32")],
    );
    assert_eq!(connect(&app, &proxy, service), None);
    assert!(took_one(&remote_service));
    let elsewhere = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), EXCLUDED_PORT);
    assert_eq!(connect(&app, &proxy, elsewhere), Some(elsewhere));

    // A socket whose connect to the proxy failed (nothing listens on this outbound port)
    // and that connects again, to an excluded destination, keeps nothing of the first
    // attempt: its peer is where it went.
    let closed_port = OUTBOUND_PORT + 1;
    register(
        &app,
        &cfg,
        closed_port,
        &["--exclude-outbound-ports", &EXCLUDED_PORT.to_string()],
    );
    let peer = app
        .enter(|| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // Blocking connects: after a failed non-blocking one Linux answers the next
            // connect with ECONNABORTED first.
            let refused = socket.connect(&SocketAddr::V4(service).into());
            assert_eq!(
                refused.map_err(|e| e.kind()).err(),
                Some(std::io::ErrorKind::ConnectionRefused),
                "sent to the closed outbound port"
            );
            socket.connect(&SocketAddr::V4(excluded).into()).unwrap();
            socket.peer_addr().unwrap().as_socket()
        })
        .unwrap();
    assert_eq!(peer, Some(SocketAddr::V4(excluded)));
    assert!(took_one(&remote_excluded));

    // Out again: the connection goes where the app asked.
    weft_iptables_ebpf(&app, &cfg, &["transparent", "--remove"]);
    let shown = weft_iptables_ebpf(&app, &cfg, &["show"]);
    assert!(
        shown.contains("this network namespace is not registered"),
        "{shown}"
    );
    assert_eq!(connect(&app, &proxy, excluded), None);
    assert!(took_one(&remote_excluded));
}
