//! Apps and clients: a line server standing in for an application, and requests made the
//! way an app makes them (a plain `connect()` from inside its host's namespace, so the
//! host's iptables rules send it through the sidecar). Also an HTTP/1.0 getter for the
//! admin and REST endpoints.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use weft_tests::Host;

fn serve_http(conn: TcpStream, label: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let body = format!("{label} {path}");
    let mut w = write_half;
    let _ = write!(
        w,
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A line server standing in for an application. For each line it answers
/// `<label> <peer-ip> <line>`; a line `SLOW <ms> …` is answered after `<ms>` milliseconds.
pub struct App {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl App {
    /// Listens on `0.0.0.0:port` inside `host`.
    pub fn start(host: &Host, port: u16, label: &str) -> App {
        Self::serve(host, port, label, serve_lines)
    }

    /// An HTTP app instead: answers every request with `200` and the body `<label> <path>`,
    /// one request per connection.
    pub fn start_http(host: &Host, port: u16, label: &str) -> App {
        Self::serve(host, port, label, |conn, _, label| serve_http(conn, label))
    }

    fn serve(host: &Host, port: u16, label: &str, serve: fn(TcpStream, SocketAddr, &str)) -> App {
        let listener = host
            .enter(move || TcpListener::bind(("0.0.0.0", port)))
            .expect("enter")
            .expect("bind the app");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let label = label.to_string();
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let label = label.clone();
                            std::thread::spawn(move || serve(conn, peer, &label));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        App {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_lines(conn: TcpStream, peer: SocketAddr, label: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if let Some(ms) = line
            .strip_prefix("SLOW ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|ms| ms.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        // One write per reply: several small ones would meet Nagle and delayed ACKs.
        let reply = format!("{label} {} {line}\n", peer.ip());
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Connects from the current thread's namespace, as an app would.
pub fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Sends `line` on `conn` and reads one line back; an error when the peer closes first.
pub fn exchange(conn: &mut TcpStream, line: &str) -> std::io::Result<String> {
    conn.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed without a reply (got {reply:?})"),
                ));
            }
            _ if byte[0] == b'\n' => break,
            _ => reply.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// One request on a new connection from the current thread's namespace.
pub fn request(to: SocketAddr, line: &str) -> std::io::Result<String> {
    exchange(&mut connect(to)?, line)
}

/// One request on a new connection from `host`, as its app would make it (so its iptables
/// rules send it through its sidecar).
pub fn request_from(host: &Host, to: SocketAddr, line: &str) -> std::io::Result<String> {
    let line = line.to_string();
    host.enter(move || request(to, &line)).expect("enter")
}

pub(crate) fn connect_in(host: &Host, to: SocketAddr) -> std::io::Result<TcpStream> {
    host.enter(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
        .expect("enter")
}

/// `GET path` over HTTP/1.0 from inside `host`: (status, body).
pub fn http_get(host: &Host, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut conn = connect_in(host, addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}
