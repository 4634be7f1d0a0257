//! Protocol detection: is a plaintext connection HTTP/1.x, HTTP/2 (prior knowledge), or
//! something else?
//!
//! The detector reads what the client sends first, for at most a short timeout (default
//! 100 ms). A client that says nothing in that window is taken to speak a
//! server-speaks-first protocol (MySQL, SMTP, …) and its connection becomes opaque TCP, so the
//! server's banner reaches it with at most that delay — never linkerd2-proxy's 10 s stall.
//! The bytes read are handed back so the caller can forward them.

use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// How long detection waits for the client's first bytes by default.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// The longest detection waits, whatever the timeout says.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The most bytes detection reads before it decides.
pub const DETECT_BUFFER_SIZE: usize = 1024;

/// The HTTP/2 connection preface a prior-knowledge client sends first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (the preface), including gRPC.
    Http2,
    /// Anything else: forwarded as bytes.
    Opaque,
}

impl Protocol {
    /// The metric label of the protocol.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "tcp",
        }
    }
}

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// The protocol.
    pub protocol: Protocol,
    /// Whether the timeout ran out before a decision (the protocol is then `Opaque`).
    pub timed_out: bool,
    /// The bytes read from the client; they must be forwarded before anything else.
    pub prefix: Vec<u8>,
}

/// Reads the client's first bytes from `io` until the protocol is known, the buffer is full,
/// the client closes, or `timeout` runs out.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use weft_proxy::detect::{detect, Protocol};
/// let mut client: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
/// let d = detect(&mut client, std::time::Duration::from_millis(100)).await.unwrap();
/// assert_eq!(d.protocol, Protocol::Http1);
/// # });
/// ```
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> io::Result<Detection> {
    // Capped: an `Instant` cannot go arbitrarily far ahead, and a flag may ask for that.
    let deadline = Instant::now() + timeout.min(MAX_WAIT);
    let mut buf = Vec::new();
    loop {
        if buf.capacity() == 0 {
            buf.reserve_exact(DETECT_BUFFER_SIZE);
        }
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Err(_elapsed) => {
                return Ok(Detection {
                    protocol: Protocol::Opaque,
                    timed_out: true,
                    prefix: buf,
                });
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => {
                // The client closed (or the buffer is full): decide on what there is.
                let protocol = classify(&buf, true).unwrap_or(Protocol::Opaque);
                return Ok(Detection {
                    protocol,
                    timed_out: false,
                    prefix: buf,
                });
            }
            Ok(Ok(_)) => {
                let decided = match classify(&buf, false) {
                    Some(protocol) => Some(protocol),
                    // Still undecided with the buffer full: only a request line longer than
                    // the buffer gets this far (`METHOD SP` and a target of visible ASCII, its
                    // end not in sight). A long query string is no reason to lose routes,
                    // metrics and tracing: HTTP/1, and hyper applies its own limits to it.
                    None if buf.len() >= DETECT_BUFFER_SIZE => Some(Protocol::Http1),
                    None => None,
                };
                if let Some(protocol) = decided {
                    return Ok(Detection {
                        protocol,
                        timed_out: false,
                        prefix: buf,
                    });
                }
            }
        }
    }
}

/// Classifies the first bytes of a connection. `None` means more bytes are needed; with
/// `complete` (no more bytes will come) the answer is always `Some`.
pub fn classify(buf: &[u8], complete: bool) -> Option<Protocol> {
    if buf.is_empty() {
        return complete.then_some(Protocol::Opaque);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else if complete {
            Some(Protocol::Opaque)
        } else {
            None
        };
    }
    match request_line(buf) {
        Line::Http1 => Some(Protocol::Http1),
        Line::NotHttp => Some(Protocol::Opaque),
        Line::Partial if complete => Some(Protocol::Opaque),
        Line::Partial => None,
    }
}

enum Line {
    Http1,
    NotHttp,
    Partial,
}

/// Longer method tokens are not taken for HTTP.
const MAX_METHOD_LEN: usize = 24;

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks `METHOD SP request-target SP HTTP/1.d CRLF` as far as the bytes go.
fn request_line(buf: &[u8]) -> Line {
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(i) => buf[..i].strip_suffix(b"\r").unwrap_or(&buf[..i]),
        // A lone trailing CR may be the first half of the CRLF.
        None => buf.strip_suffix(b"\r").unwrap_or(buf),
    };
    let partial = line_end.is_none();
    // Method.
    let Some(sp1) = line.iter().position(|&b| !is_tchar(b)) else {
        return if partial && line.len() <= MAX_METHOD_LEN {
            Line::Partial
        } else {
            Line::NotHttp
        };
    };
    if sp1 == 0 || sp1 > MAX_METHOD_LEN || line[sp1] != b' ' {
        return Line::NotHttp;
    }
    // Request target: visible ASCII up to the next space.
    let rest = &line[sp1 + 1..];
    let Some(sp2) = rest.iter().position(|&b| b == b' ') else {
        return if rest.iter().all(|b| b.is_ascii_graphic()) && partial {
            Line::Partial
        } else {
            Line::NotHttp
        };
    };
    if sp2 == 0 || !rest[..sp2].iter().all(|b| b.is_ascii_graphic()) {
        return Line::NotHttp;
    }
    let version = &rest[sp2 + 1..];
    let known = |v: &[u8]| b"HTTP/1.1".starts_with(v) || b"HTTP/1.0".starts_with(v);
    match (partial, version.len() == 8 && known(version)) {
        (false, true) => Line::Http1,
        (true, _) if version.len() <= 8 && known(version) => Line::Partial,
        _ => Line::NotHttp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_request_line_longer_than_the_buffer_is_http1() {
        let line = format!(
            "GET /search?q={} HTTP/1.1\r\nhost: a\r\n\r\n",
            "x".repeat(1100)
        );
        let mut client: &[u8] = line.as_bytes();
        let d = detect(&mut client, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert_eq!(d.prefix.len(), DETECT_BUFFER_SIZE);
        // Any timeout is taken, however long.
        let mut client: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let d = detect(&mut client, Duration::MAX).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        // Bytes that are not a request line stay opaque, full buffer or not.
        let noise = vec![b'x'; 2 * DETECT_BUFFER_SIZE];
        let mut client: &[u8] = &noise;
        let d = detect(&mut client, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
    }

    #[test]
    fn classifies() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n", false),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"POST /x?y=1 HTTP/1.0\n", false),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE, false), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HT", false), None);
        assert_eq!(classify(b"PRI * HT", true), Some(Protocol::Opaque));
        assert_eq!(classify(b"GE", false), None);
        assert_eq!(classify(b"GET /abc", false), None);
        assert_eq!(classify(b"GET /abc HTTP/1", false), None);
        assert_eq!(classify(b"GET /abc HTTP/2", false), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"GET /abc HTTP/1.1 x\r\n", false),
            Some(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00", false),
            Some(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"SSH-2.0-OpenSSH\r\n", false),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"hello world\r\n", false), Some(Protocol::Opaque));
        assert_eq!(classify(b"", false), None);
        assert_eq!(classify(b"", true), Some(Protocol::Opaque));
    }

    #[test]
    fn decisions_do_not_change_with_more_bytes() {
        let long_method = format!("{} / HTTP/1.1\r\n", "A".repeat(30));
        let samples: [&[u8]; 8] = [
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.1\rX",
            H2_PREFACE,
            b"PRI * HTTP/2.0\r\n\r\nXX",
            b"OPTIONS * HTTP/1.0\n",
            b"\x16\x03\x01",
            b"GET /a b HTTP/1.1\r\n",
            long_method.as_bytes(),
        ];
        for data in samples {
            let whole = classify(data, true).unwrap();
            for cut in 0..=data.len() {
                if let Some(early) = classify(&data[..cut], false) {
                    let later = classify(data, false).unwrap_or(whole);
                    assert_eq!(early, later, "{:?} at {cut}", String::from_utf8_lossy(data));
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_as_opaque() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let start = Instant::now();
        let d = detect(&mut server, DEFAULT_DETECT_TIMEOUT).await.unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.timed_out);
        assert!(d.prefix.is_empty());
        assert_eq!(start.elapsed(), DEFAULT_DETECT_TIMEOUT);
        client.write_all(b"x").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn http1_byte_by_byte() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\n" {
                client.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client
        });
        let d = detect(&mut server, DEFAULT_DETECT_TIMEOUT).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert_eq!(d.prefix, b"GET / HTTP/1.1\r\n");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn h2_preface_split() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&H2_PREFACE[10..]).await.unwrap();
            client
        });
        let d = detect(&mut server, DEFAULT_DETECT_TIMEOUT).await.unwrap();
        assert_eq!(d.protocol, Protocol::Http2);
        assert!(!d.timed_out);
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn partial_then_silence_is_opaque_with_the_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /x").await.unwrap();
        let d = detect(&mut server, DEFAULT_DETECT_TIMEOUT).await.unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.timed_out);
        assert_eq!(d.prefix, b"GET /x");
    }

    #[tokio::test(start_paused = true)]
    async fn close_before_decision() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET").await.unwrap();
        drop(client);
        let d = detect(&mut server, DEFAULT_DETECT_TIMEOUT).await.unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(!d.timed_out);
        assert_eq!(d.prefix, b"GET");
    }
}
