//! A packet capture without tcpdump: a raw `AF_PACKET` socket in a namespace.

use std::fs;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Every frame seen in a namespace (all its interfaces), kept in memory, from a raw
/// `AF_PACKET` socket: no tcpdump needed. Capture in a LAN's bridge namespace to see the
/// wire between hosts.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u8>>>,
}

impl Capture {
    pub fn start(netns: &str) -> Capture {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt,
        };
        let ns = fs::File::open(format!("/run/netns/{netns}")).expect("open the namespace");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let fd = socket(
                    AddressFamily::Packet,
                    SockType::Raw,
                    SockFlag::empty(),
                    SockProtocol::EthAll,
                )
                .expect("an AF_PACKET socket");
                setsockopt(
                    &fd,
                    sockopt::ReceiveTimeout,
                    &nix::sys::time::TimeVal::new(0, 20_000),
                )
                .expect("SO_RCVTIMEO");
                let mut sock = fs::File::from(fd);
                let _ = ready_tx.send(());
                let mut seen = Vec::new();
                let mut frame = vec![0u8; 65536];
                // Frames still queued when told to stop are read too: stop only after a
                // timeout (an empty queue).
                loop {
                    match sock.read(&mut frame) {
                        Ok(n) => seen.extend_from_slice(&frame[..n]),
                        Err(_) if stop.load(Ordering::Relaxed) => return seen,
                        Err(_) => {}
                    }
                }
            })
        };
        ready_rx.recv().expect("the capture starts");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns every byte captured.
    pub fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(100));
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the capture thread")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
