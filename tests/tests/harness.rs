//! Tests of the namespace harness itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weft_tests::{Net, require_root};

const T: Duration = Duration::from_secs(5);

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn linked_hosts_talk_tcp_in_process() {
    require_root!();
    let net = Net::new().unwrap();
    let a = net.host("a").unwrap();
    let b = net.host("b").unwrap();
    let link = net.link(&a, &b).unwrap();
    assert_eq!(a.ip(), link.a.ip);
    assert_eq!(b.ip().to_string(), "10.77.0.2");

    let listener = b.enter(|| TcpListener::bind((b.ip(), 0)).unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        peer
    });
    let got = a
        .enter(|| {
            let mut s = TcpStream::connect_timeout(&SocketAddr::from((b.ip(), port)), T).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut buf = [0; 2];
            s.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&got, b"hi");
    assert_eq!(server.join().unwrap().ip(), a.ip());
}

#[test]
fn lan_joins_three_hosts() {
    require_root!();
    let net = Net::new().unwrap();
    let hosts: Vec<_> = ["x", "y", "z"]
        .iter()
        .map(|l| net.host(l).unwrap())
        .collect();
    let lan = net.lan(&hosts.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(lan.members[2].ip.to_string(), "10.77.0.3");
    let out = hosts[0]
        .sh(&format!(
            "ping -c1 -W2 {} >/dev/null && ip -br addr",
            hosts[2].ip()
        ))
        .or_else(|_| hosts[0].sh("ip -br addr"))
        .unwrap();
    assert!(out.contains("10.77.0.1/24"), "{out}");
    // Reachability without relying on ping being installed.
    let l = hosts[2]
        .enter(|| TcpListener::bind(("0.0.0.0", 7000)).unwrap())
        .unwrap();
    let ip = hosts[2].ip();
    hosts[1]
        .enter(move || TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), T).unwrap())
        .unwrap();
    drop(l);
}

#[test]
fn spawned_processes_run_inside_and_die_with_the_guard() {
    require_root!();
    let net = Net::new().unwrap();
    let a = net.host("a").unwrap();
    let out = a.sh("ip -o link show | wc -l").unwrap();
    assert_eq!(out.trim(), "1", "only lo is visible inside");

    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let proc = a.spawn(cmd).unwrap();
    let pid = proc.pid();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(proc);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped"
    );
}

#[test]
fn output_is_bounded_in_time() {
    require_root!();
    let net = Net::new().unwrap();
    let a = net.host("a").unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let err = a.output(cmd, Duration::from_millis(200)).unwrap_err();
    assert!(err.to_string().contains("did not finish"), "{err}");
}

#[test]
fn teardown_happens_even_on_panic() {
    require_root!();
    let mut names = Vec::new();
    let mut leaked = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = Net::new().unwrap();
        let a = net.host("a").unwrap();
        let b = net.host("b").unwrap();
        net.link(&a, &b).unwrap();
        names = vec![a.netns().to_string(), b.netns().to_string()];
        // A process started behind the harness's back is killed too.
        let child = Command::new("ip")
            .args(["netns", "exec", a.netns(), "sleep", "60"])
            .spawn()
            .unwrap();
        leaked = Some(child);
        assert!(names.iter().all(|n| netns_exists(n)));
        panic!("boom");
    }));
    assert!(result.is_err());
    assert!(names.iter().all(|n| !netns_exists(n)), "namespaces deleted");
    // The leaked child was killed by the teardown.
    let mut child = leaked.unwrap();
    let deadline = std::time::Instant::now() + T;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leaked child still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success());
}

#[test]
fn hosts_keep_the_net_alive() {
    require_root!();
    let a = {
        let net = Net::new().unwrap();
        net.host("a").unwrap()
    };
    assert!(netns_exists(a.netns()));
    let name = a.netns().to_string();
    drop(a);
    assert!(!netns_exists(&name));
}
