//! End-to-end tests of the installed rules, inside network namespaces, in
//! both iptables-nft and iptables-legacy modes. They need root and skip
//! (visibly) without it.
//!
//! Topology: `app` (where the rules are installed, default route via
//! `peer`) ⇄ `peer`, on 10.77.0.0/24. Test listeners stand in for the
//! proxy's ports. Connections "as the proxy" are made from sockets created
//! while the thread's fsuid is the proxy uid, which is exactly what the
//! `owner` match looks at.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::unistd::{Uid, setfsuid};
use socket2::{Domain, SockRef, Socket, Type};
use weft_tests::{Host, Net, require_root};

const BIN: &str = env!("CARGO_BIN_EXE_weft-iptables");
const T: Duration = Duration::from_secs(3);
const PROXY_UID: u32 = 5678;
/// An address outside the test network, routed via `peer`.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 7);

struct Setup {
    _net: Net,
    app: Host,
    peer: Host,
    mode: &'static str,
}

fn setup(mode: &'static str) -> Setup {
    let net = Net::new().unwrap();
    let app = net.host("app").unwrap();
    let peer = net.host("peer").unwrap();
    net.link(&app, &peer).unwrap();
    app.default_route(peer.ip()).unwrap();
    Setup {
        _net: net,
        app,
        peer,
        mode,
    }
}

impl Setup {
    /// Runs `weft-iptables <args> --iptables-mode <mode>` inside `app`.
    fn weft(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(BIN);
        cmd.args(args).args(["--iptables-mode", self.mode]);
        let out = self.app.output(cmd, Duration::from_secs(20)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "weft-iptables {args:?}: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every table of `app`, as `iptables-save` prints it, without the
    /// timestamp comments and packet counters.
    fn save(&self, family: &str) -> String {
        let raw = self
            .app
            .sh(&format!("{family}-{}-save", self.mode))
            .unwrap();
        raw.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rfind(" [") {
                Some(i) if l.starts_with(':') => format!("{} [0:0]", &l[..i]),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn iptables(&self, args: &str) {
        self.app
            .sh(&format!("iptables-{} {args}", self.mode))
            .unwrap();
    }
}

/// A listener inside `host`, non-blocking so that accepts can be bounded.
fn listen(host: &Host, addr: SocketAddr) -> TcpListener {
    host.enter(|| {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        l
    })
    .unwrap()
}

fn accept(l: &TcpListener) -> (TcpStream, SocketAddr) {
    let deadline = Instant::now() + T;
    loop {
        match l.accept() {
            Ok(pair) => return pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept on {:?}: {e}", l.local_addr()),
        }
    }
}

/// Asserts that nothing is waiting on `l`. A connect() returns only after
/// the handshake, so a connection that went there would already be queued.
fn assert_idle(l: &TcpListener, why: &str) {
    match l.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!(
            "{why}: unexpected connection from {peer} on {:?}",
            l.local_addr()
        ),
        Err(e) => panic!("{why}: {e}"),
    }
}

/// Connects from inside `host`, optionally as `uid` (the socket is created
/// with that fsuid) and from source address `src`.
fn connect(host: &Host, uid: Option<u32>, src: Option<IpAddr>, dst: SocketAddr) -> TcpStream {
    host.enter(|| {
        let previous = uid.map(|u| setfsuid(Uid::from_raw(u)));
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None);
        if let Some(p) = previous {
            setfsuid(p);
        }
        let socket = socket.unwrap();
        if let Some(src) = src {
            socket.bind(&SocketAddr::new(src, 0).into()).unwrap();
        }
        socket
            .connect_timeout(&dst.into(), T)
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        TcpStream::from(socket)
    })
    .unwrap()
}

fn original_dst(s: &TcpStream) -> SocketAddr {
    let sock = SockRef::from(s);
    let addr = if s.local_addr().unwrap().is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    addr.unwrap().as_socket().unwrap()
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

// ---- scenarios, each run in both modes by the macro below ----

fn outbound_is_redirected_with_original_destination(mode: &'static str) {
    let s = setup(mode);
    s.weft(&["install"]);
    let outbound = listen(&s.app, any(15001));
    for dst in [
        SocketAddr::from((OUTSIDE, 8080)),
        SocketAddr::from((s.peer.ip(), 80)),
    ] {
        let _c = connect(&s.app, None, None, dst);
        let (conn, _) = accept(&outbound);
        assert_eq!(original_dst(&conn), dst);
    }
}

fn inbound_is_redirected(mode: &'static str) {
    let s = setup(mode);
    s.weft(&["install"]);
    let inbound = listen(&s.app, any(15006));
    let app_port = listen(&s.app, any(8080));
    let dst = SocketAddr::from((s.app.ip(), 8080));
    let _c = connect(&s.peer, None, None, dst);
    let (conn, from) = accept(&inbound);
    assert_eq!(from.ip(), IpAddr::from(s.peer.ip()));
    assert_eq!(original_dst(&conn), dst);
    assert_idle(&app_port, "inbound must go through the proxy");
}

fn proxy_uid_is_not_redirected(mode: &'static str) {
    let s = setup(mode);
    s.weft(&["install"]);
    let outbound = listen(&s.app, any(15001));
    let upstream = listen(&s.peer, any(9000));
    let dst = SocketAddr::from((s.peer.ip(), 9000));

    let _c = connect(&s.app, Some(PROXY_UID), None, dst);
    accept(&upstream);
    assert_idle(&outbound, "the proxy's own connection");

    // The same connection from another uid is redirected.
    let _c = connect(&s.app, Some(1000), None, dst);
    accept(&outbound);
    assert_idle(&upstream, "uid 1000");
}

fn excluded_ports_and_cidrs_are_not_redirected(mode: &'static str) {
    let s = setup(mode);
    let outbound = listen(&s.app, any(15001));
    let inbound = listen(&s.app, any(15006));
    let (p1, p2) = (listen(&s.peer, any(9001)), listen(&s.peer, any(9002)));
    let peer = |port| SocketAddr::from((s.peer.ip(), port));

    s.weft(&[
        "install",
        "--exclude-outbound-ports",
        "9001",
        "--exclude-inbound-ports",
        "8081",
    ]);
    let _c = connect(&s.app, None, None, peer(9001));
    accept(&p1);
    let _c = connect(&s.app, None, None, peer(9002));
    accept(&outbound);
    assert_idle(&p2, "port 9002 is not excluded");

    let app_8081 = listen(&s.app, any(8081));
    let _c = connect(&s.peer, None, None, SocketAddr::from((s.app.ip(), 8081)));
    accept(&app_8081);
    assert_idle(&inbound, "inbound port 8081 is excluded");

    // Reinstalling with other flags replaces the earlier rules.
    let cidr = format!("{}/32", s.peer.ip());
    s.weft(&["install", "--exclude-outbound-ips", &cidr]);
    let _c = connect(&s.app, None, None, peer(9002));
    accept(&p2);
    assert_idle(&outbound, "the peer's address is excluded");
    let _c = connect(&s.app, None, None, SocketAddr::from((OUTSIDE, 9001)));
    let (conn, _) = accept(&outbound);
    assert_eq!(
        original_dst(&conn),
        SocketAddr::from((OUTSIDE, 9001)),
        "9001 no longer excluded"
    );
}

fn loopback_is_not_redirected(mode: &'static str) {
    let s = setup(mode);
    s.weft(&["install"]);
    let outbound = listen(&s.app, any(15001));
    let inbound = listen(&s.app, any(15006));
    let local = listen(&s.app, any(7070));
    let own_ip = SocketAddr::from((s.app.ip(), 7070));

    for dst in [SocketAddr::from((Ipv4Addr::LOCALHOST, 7070)), own_ip] {
        let _c = connect(&s.app, None, None, dst);
        accept(&local);
    }
    // The proxy reaching its own address goes through inbound…
    let _c = connect(&s.app, Some(PROXY_UID), None, own_ip);
    let (conn, _) = accept(&inbound);
    assert_eq!(original_dst(&conn), own_ip);
    // …unless it comes from the loop guard, as the proxy's forwarding does.
    let guard = Some(IpAddr::from(Ipv4Addr::new(127, 0, 0, 6)));
    let _c = connect(&s.app, Some(PROXY_UID), guard, own_ip);
    accept(&local);
    assert_idle(&outbound, "loopback");
    assert_idle(&inbound, "loop guard");
}

fn install_is_idempotent_and_uninstall_exact(mode: &'static str) {
    let s = setup(mode);
    // Foreign state: rules in nat and filter, and a chain of someone else's.
    s.iptables("-t nat -N FOREIGN");
    s.iptables("-t nat -A FOREIGN -p tcp --dport 1234 -j RETURN");
    s.iptables("-t nat -A OUTPUT -d 10.55.0.1/32 -p tcp -j FOREIGN");
    s.iptables("-A INPUT -p tcp --dport 22 -j ACCEPT");
    let before = s.save("iptables");
    assert!(s.weft(&["show"]).contains("no weft rules installed"));

    s.weft(&["install", "--redirect-dns"]);
    let once = s.save("iptables");
    s.weft(&["install", "--redirect-dns"]);
    assert_eq!(
        s.save("iptables"),
        once,
        "install twice gives the same ruleset"
    );
    assert!(once.contains(":WEFT_OUTBOUND_REDIRECT"));
    assert!(once.contains("-A OUTPUT -d 10.55.0.1/32 -p tcp -j FOREIGN"));
    // Every line install added carries the comment or names a WEFT_ chain.
    for line in once.lines().filter(|l| !before.contains(*l)) {
        assert!(
            line.contains("weft/transparent-proxy") || line.contains("WEFT_"),
            "{line}"
        );
    }

    let shown = s.weft(&["show"]);
    assert!(shown.contains(&format!("(iptables-{mode})")), "{shown}");
    assert!(shown.contains("-A WEFT_OUTBOUND_REDIRECT"), "{shown}");
    assert!(!shown.contains("FOREIGN"), "{shown}");

    s.weft(&["uninstall"]);
    let after = s.save("iptables");
    assert!(
        !after.contains("WEFT_") && !after.contains("weft/"),
        "{after}"
    );
    assert_eq!(after, before, "foreign rules survive untouched");
    // Uninstalling again is a no-op.
    s.weft(&["uninstall"]);
    assert_eq!(s.save("iptables"), before);
}

fn ipv6_rules_redirect_too(mode: &'static str) {
    let s = setup(mode);
    s.app
        .sh("ip -6 addr add fd77::1/64 dev eth0 nodad && ip -6 route add default via fd77::2")
        .unwrap();
    s.peer
        .sh("ip -6 addr add fd77::2/64 dev eth0 nodad")
        .unwrap();
    s.weft(&["install", "--ipv6"]);
    assert!(
        s.app
            .sh("ip -6 addr show dev lo")
            .unwrap()
            .contains("::6/128")
    );
    let v6 = s.save("ip6tables");
    assert!(v6.contains("-s ::6/128 -o lo"), "{v6}");

    let outbound = listen(&s.app, "[::]:15001".parse().unwrap());
    let dst: SocketAddr = "[fd99::7]:8080".parse().unwrap();
    let _c = connect(&s.app, None, None, dst);
    let (conn, _) = accept(&outbound);
    assert_eq!(original_dst(&conn), dst);

    s.weft(&["uninstall", "--ipv6"]);
    assert!(!s.save("ip6tables").contains("WEFT_"));
    assert!(!s.save("iptables").contains("WEFT_"));
}

fn dns_is_redirected_when_asked(mode: &'static str) {
    let s = setup(mode);
    let udp = |host: &Host, addr: SocketAddr| {
        host.enter(|| {
            let u = UdpSocket::bind(addr).unwrap();
            u.set_read_timeout(Some(T)).unwrap();
            u
        })
        .unwrap()
    };
    let proxy_dns = udp(&s.app, any(15053));
    let resolver = udp(&s.peer, any(53));
    let resolver_addr = SocketAddr::from((s.peer.ip(), 53));
    let mut buf = [0; 16];

    s.weft(&["install"]);
    let client = udp(&s.app, any(0));
    client.send_to(b"plain", resolver_addr).unwrap();
    let (n, _) = resolver.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"plain",
        "no DNS redirect without --redirect-dns"
    );

    s.weft(&["install", "--redirect-dns"]);
    let client = udp(&s.app, any(0));
    client.send_to(b"app", resolver_addr).unwrap();
    let (n, _) = proxy_dns.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"app");

    // The proxy's own queries reach the real resolver.
    let as_proxy = s
        .app
        .enter(|| {
            let previous = setfsuid(Uid::from_raw(PROXY_UID));
            let u = UdpSocket::bind(any(0));
            setfsuid(previous);
            u.unwrap()
        })
        .unwrap();
    as_proxy.send_to(b"proxy", resolver_addr).unwrap();
    let (n, _) = resolver.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"proxy");
}

macro_rules! in_both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod nft {
            $(#[test] fn $scenario() { weft_tests::require_root!(); super::$scenario("nft"); })*
        }
        mod legacy {
            $(#[test] fn $scenario() { weft_tests::require_root!(); super::$scenario("legacy"); })*
        }
    };
}

in_both_modes!(
    outbound_is_redirected_with_original_destination,
    inbound_is_redirected,
    proxy_uid_is_not_redirected,
    excluded_ports_and_cidrs_are_not_redirected,
    loopback_is_not_redirected,
    install_is_idempotent_and_uninstall_exact,
    ipv6_rules_redirect_too,
    dns_is_redirected_when_asked,
);

#[test]
fn auto_mode_follows_existing_rules() {
    require_root!();
    let s = setup("auto");
    let show = |s: &Setup| s.weft(&["show"]);
    assert!(show(&s).contains("(iptables-nft)"), "a clean host gets nft");
    s.app
        .sh("iptables-legacy -t nat -A OUTPUT -d 10.55.0.1/32 -j RETURN")
        .unwrap();
    assert!(
        show(&s).contains("(iptables-legacy)"),
        "only legacy has rules"
    );
    s.app
        .sh("iptables-nft -t nat -A OUTPUT -d 10.55.0.1/32 -j RETURN")
        .unwrap();
    assert!(show(&s).contains("(iptables-nft)"), "both have rules");
}
