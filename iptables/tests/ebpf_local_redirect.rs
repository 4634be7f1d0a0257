//! End to end: `weft-iptables ebpf install` makes a loopback connection inside a network
//! namespace skip the TCP/IP stack, and `uninstall` puts it back, with the bytes the same
//! both ways. The proof that the stack was skipped is the namespace's own count of TCP
//! segments sent (`Tcp: OutSegs` in `/proc/net/snmp`): a ping-pong of N messages sends about
//! 2N segments through the stack, and only the handshake and the close when redirected.
//!
//! The programs are attached to a cgroup of the test's own (a child of the cgroup2 mount, or
//! of one it mounts) and pinned in a bpf filesystem it mounts, so nothing outside the test is
//! touched; only the sockets this test process creates while it sits in that cgroup are
//! recorded. Guards move the process back, uninstall, remove the cgroup and unmount, also when
//! the test fails. Needs root, clang at build time, and bpftool (`.ci/run` installs both).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use weft_iptables::ebpf::{self, EbpfConfig};
use weft_tests::cgroup::{Mount, TestCgroup};
use weft_tests::{Host, Net, require_root};

const BIN: &str = env!("CARGO_BIN_EXE_weft-iptables");
const ROUNDS: usize = 2000;

/// Uninstalls on drop.
struct Installed(EbpfConfig);

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = ebpf::uninstall(&self.0);
    }
}

/// The namespace's `Tcp: OutSegs`.
fn out_segments(host: &Host) -> u64 {
    let snmp = host.sh("cat /proc/net/snmp").unwrap();
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "OutSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap()
}

/// `ROUNDS` messages of 64 bytes echoed to 127.0.0.1 from `source` inside `host`; checks
/// every byte and returns the segments the namespace sent meanwhile.
fn ping_pong(host: &Host, source: Ipv4Addr) -> u64 {
    let before = out_segments(host);
    host.enter(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let (mut conn, _) = listener.accept().unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 64];
                for _ in 0..ROUNDS {
                    conn.read_exact(&mut buf).unwrap();
                    conn.write_all(&buf).unwrap();
                }
            });
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
            socket.connect(&addr.into()).unwrap();
            let mut conn: TcpStream = socket.into();
            conn.set_nodelay(true).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut back = [0u8; 64];
            for i in 0..ROUNDS {
                let msg = [(i % 251) as u8; 64];
                conn.write_all(&msg).unwrap();
                conn.read_exact(&mut back).unwrap();
                assert_eq!(back, msg, "round {i}: the echo differs");
            }
        });
    })
    .unwrap();
    out_segments(host) - before
}

/// The first bytes of [`peek_then_bulk`]'s connection, which the server peeks at.
const HELLO: &[u8; 16] = b"GET / HTTP/1.1\r\n";
/// The upload of [`peek_then_bulk`], after [`HELLO`].
const BULK: usize = 32 << 20;

/// Byte `i` of the upload.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) % 253) as u8
}

/// A running checksum over `bytes`.
fn checksum(acc: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(acc, |acc, &b| {
        acc.wrapping_mul(31).wrapping_add(u64::from(b))
    })
}

/// What the proxy's protocol sniffing and a large upload do on one connection: the server
/// peeks at the first bytes before reading them, the client sends `BULK` bytes after them and
/// half-closes, the server reads to the end and answers with the count and a checksum. Checks
/// that a peek leaves the bytes to be read, that no byte is lost or reordered and that the
/// end of the stream comes after the last byte; returns the segments the namespace sent.
fn peek_then_bulk(host: &Host) -> u64 {
    let before = out_segments(host);
    host.enter(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| bulk_server(&listener));
            bulk_client(addr);
        });
    })
    .unwrap();
    out_segments(host) - before
}

fn bulk_server(listener: &TcpListener) {
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut peeked = [0u8; 16];
    let mut seen = 0;
    while seen < peeked.len() {
        seen = conn.peek(&mut peeked).unwrap();
        assert!(seen > 0, "the peer closed before its first bytes");
    }
    assert_eq!(&peeked, HELLO, "peek");
    let mut hello = [0u8; 16];
    conn.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, HELLO, "the peeked bytes are still there to read");
    let (mut count, mut sum) = (0usize, 0u64);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (j, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(count + j), "byte {} of the upload", count + j);
        }
        sum = checksum(sum, &buf[..n]);
        count += n;
    }
    let mut answer = [0u8; 16];
    answer[..8].copy_from_slice(&(count as u64).to_be_bytes());
    answer[8..].copy_from_slice(&sum.to_be_bytes());
    conn.write_all(&answer).unwrap();
}

fn bulk_client(addr: SocketAddr) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(HELLO).unwrap();
    let data: Vec<u8> = (0..BULK).map(pattern).collect();
    for chunk in data.chunks(64 << 10) {
        conn.write_all(chunk).unwrap();
    }
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    // Read as a non-blocking reader does (tokio, the proxy), taking "would block" as "not
    // yet": with the redirect the kernel can end a blocking read early with EAGAIN (see the
    // README's "eBPF local redirect").
    let mut answer = [0u8; 16];
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got < answer.len() {
        match conn.read(&mut answer[got..]) {
            Ok(0) => panic!("the server closed before its answer"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < deadline, "no answer in 10 s");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    let count = u64::from_be_bytes(answer[..8].try_into().unwrap());
    let sum = u64::from_be_bytes(answer[8..].try_into().unwrap());
    assert_eq!(count, BULK as u64, "bytes the server read before the end");
    assert_eq!(sum, checksum(0, &data), "checksum of the upload");
}

/// Runs `weft-iptables ebpf <action>` for `cfg`'s cgroup, bpf filesystem and name.
fn weft_iptables_ebpf(action: &str, cfg: &EbpfConfig) {
    let out = Command::new(BIN)
        .args(["ebpf", action, "--name", &cfg.name])
        .arg("--cgroup-path")
        .arg(&cfg.cgroup)
        .arg("--bpffs-path")
        .arg(&cfg.bpffs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ebpf {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn local_connections_skip_the_stack_while_installed() {
    require_root!();
    assert!(
        ebpf::available(),
        "weft-iptables was built without its eBPF programs: install clang and libbpf-dev"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let (_cgroup2_mount, cgroup2_root) = match ebpf::first_mount(&mounts, "cgroup2") {
        Some(root) => (None, root),
        None => {
            let m = Mount::new("cgroup2", "none").unwrap();
            let root = m.path().to_path_buf();
            (Some(m), root)
        }
    };
    let bpffs = Mount::new("bpf", "bpf").unwrap();
    let net = Net::new().unwrap();
    let host = net.host("app").unwrap();
    let cgroup = TestCgroup::enter(&cgroup2_root, "weft-ebpf-test").unwrap();

    let baseline = ping_pong(&host, Ipv4Addr::LOCALHOST);
    assert!(
        baseline >= 2 * ROUNDS as u64,
        "without the programs every message is a segment: {baseline} for {ROUNDS} rounds"
    );

    let cfg = EbpfConfig {
        name: "test".into(),
        ..EbpfConfig::new(cgroup.path(), bpffs.path())
    };
    let installed = Installed(cfg.clone());
    weft_iptables_ebpf("install", &cfg);
    assert!(ebpf::is_attached(&cfg).unwrap());
    assert!(cfg.pin_dir().join("maps").join("weft_socks").exists());

    let redirected = ping_pong(&host, Ipv4Addr::LOCALHOST);
    assert!(
        redirected < 50,
        "with the programs only the handshake and the close take the stack: {redirected} \
         segments for {ROUNDS} rounds (without: {baseline})"
    );
    // The transparent inbound reaches its app from the loop-guard address.
    let from_loop_guard = ping_pong(&host, Ipv4Addr::new(127, 0, 0, 6));
    assert!(
        from_loop_guard < 50,
        "127.0.0.6 to 127.0.0.1 is local too: {from_loop_guard} segments"
    );
    let bulk = peek_then_bulk(&host);
    assert!(
        bulk < 50,
        "a redirected 32 MiB upload sends no data segments: {bulk} segments"
    );

    weft_iptables_ebpf("uninstall", &cfg);
    assert!(!ebpf::is_attached(&cfg).unwrap());
    assert!(!cfg.pin_dir().exists());
    drop(installed);

    let after = ping_pong(&host, Ipv4Addr::LOCALHOST);
    let bulk_after = peek_then_bulk(&host);
    assert!(
        bulk_after > 32 << 20 >> 16,
        "without the programs a 32 MiB upload takes many segments: {bulk_after}"
    );
    eprintln!(
        "segments sent for {ROUNDS} ping-pongs: {baseline} before install, {redirected} \
         installed ({from_loop_guard} from 127.0.0.6), {after} after uninstall; for a 32 MiB \
         upload: {bulk} installed, {bulk_after} after uninstall"
    );
    assert!(
        after >= 2 * ROUNDS as u64,
        "after uninstall the stack carries every message again: {after} segments"
    );
}
