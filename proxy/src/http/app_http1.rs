//! The inbound's HTTP/1.1 client to its local app: one request at a time on a connection of
//! the inbound's pool ([`crate::http::app_pool`]), written and read in the request's own task.
//!
//! Why not hyper's client connection, which the inbound used before: hyper runs each
//! connection in a task of its own and hands it every request over a channel, then the
//! response head back over a oneshot and the response body through another channel, so a
//! request crosses between tasks four times on the inbound's busiest path. Here the request's
//! task writes the head, and the body when it is already at hand, in one write, then reads and
//! parses the response head; the response body ([`AppBody`]) is read from the socket by
//! whoever polls it, and the connection goes back to the pool the moment its last byte is
//! read. Only a request body that is still arriving when the head goes out gets a task
//! (`pump`), since it must keep flowing while the response comes back. The parsing is
//! httparse's, as in hyper.
//!
//! What it leaves to others, since the inbound never asks it: Upgrade and CONNECT (tunnels go
//! through hyper's client, see [`crate::http::tunnel`]), `Expect: 100-continue` (removed
//! before; an interim `100 Continue` from the app is skipped like every 1xx but `101`),
//! pipelining.

use crate::http::MAX_HEADERS;
use crate::http::body::Body;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll, Waker, ready};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;
use tokio_util::either::Either;

/// The most bytes of a response head (status line and headers) or of a chunked body's
/// trailers; a bigger one fails the request (502), as hyper's default limit would.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most request-body bytes gathered into the first write; a body still arriving past this
/// streams from a task of its own.
const INLINE_BODY_BYTES: usize = 64 * 1024;

/// How much room a read of the response is given.
const READ_BYTES: usize = 16 * 1024;

/// Why an exchange with the app failed before its response head arrived.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Writing the request or reading the response failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The app closed the connection before answering.
    #[error("the app closed the connection before answering")]
    Closed,
    /// The response head is not HTTP/1.x.
    #[error("invalid response head: {0}")]
    Parse(httparse::Error),
    /// The response head is bigger than [`MAX_HEAD_BYTES`].
    #[error("response head over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// More response headers than [`MAX_HEADERS`].
    #[error("more than {MAX_HEADERS} response headers")]
    TooManyHeaders,
    /// A response header the proxy cannot forward.
    #[error("invalid response header {0:?}")]
    InvalidHeader(String),
    /// `Content-Length` of the response is not one number.
    #[error("invalid content-length in the response")]
    InvalidContentLength,
    /// `101 Switching Protocols` to a request that asked for no upgrade.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedUpgrade,
    /// The request cannot be written as HTTP/1.1.
    #[error("request not sendable as HTTP/1.1: {0}")]
    Request(&'static str),
    /// The request's body failed before it was written.
    #[error("request body: {0}")]
    Body(String),
}

/// Why a response body from the app ended early.
#[derive(Debug, thiserror::Error)]
pub enum AppBodyError {
    /// Reading it failed.
    #[error("reading the app's response body: {0}")]
    Io(#[from] io::Error),
    /// The app closed the connection before the body's end.
    #[error("the app closed the connection in the middle of the response body")]
    Closed,
    /// The chunked encoding is broken.
    #[error("invalid chunked encoding in the app's response body")]
    Chunked,
    /// The trailers are broken or over [`MAX_HEAD_BYTES`].
    #[error("invalid trailers in the app's response body")]
    Trailers,
}

/// Why a streamed request body did not reach the app whole.
#[derive(Debug, thiserror::Error)]
enum PumpError {
    #[error("writing to the app: {0}")]
    Io(#[from] io::Error),
    #[error("request body: {0}")]
    Body(String),
    #[error("request body longer than its content-length")]
    TooLong,
    #[error("request body shorter than its content-length")]
    TooShort,
}

/// A connection to the app, idle between requests.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not used yet: empty on a connection fit for reuse.
    buf: BytesMut,
}

impl Conn {
    /// A fresh connection.
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can take a request: the app has neither closed it nor sent
    /// anything since the last response. Costs a system call only when the socket has become
    /// readable, which an idle connection the app keeps open never is.
    pub fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                matches!(self.io.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Where a connection goes when a response on it has ended cleanly: back to its pool, held
/// weakly by the response so that a pool dropped meanwhile just lets the connection close.
pub trait Home: Send + Sync + 'static {
    /// Takes the connection back.
    fn put(&self, conn: Conn);
}

/// How a body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the app closes the connection (responses only).
    Eof,
}

/// A request encoded for the app: its head and the body at hand, and the body still to come.
pub struct Outgoing {
    /// The head and the body gathered so far, in wire form.
    wire: Bytes,
    /// The rest of the body, to stream (`None`: `wire` is the whole request).
    rest: Option<(Body, Framing, u64)>,
    is_head: bool,
    /// RFC 9110 §9.2.2: it may be sent again when a reused connection dies under it.
    idempotent: bool,
}

/// A failed [`Outgoing::send_on`]: `retry` holds the request when nothing of it can have
/// been acted on, so it may go out again on another connection.
pub struct SendFailed {
    /// Why.
    pub error: ExchangeError,
    /// The request, when it may be sent again.
    pub retry: Option<Outgoing>,
}

impl Outgoing {
    /// Encodes `req` (origin-form URI, `Host` set, hop-by-hop headers removed) with as much
    /// of its body as has already arrived.
    pub fn new(req: Request<Body>) -> Result<Self, ExchangeError> {
        let (parts, mut body) = req.into_parts();
        // Usually one DATA frame is at hand: no vector for it.
        let mut first: Option<Bytes> = None;
        let mut more: Vec<Bytes> = Vec::new();
        let mut gathered = 0usize;
        let mut trailers = None;
        let mut ended = body.is_end_stream();
        while !ended && gathered < INLINE_BODY_BYTES {
            match now_or_never(body.frame()) {
                None => break,
                Some(None) => ended = true,
                Some(Some(Err(e))) => return Err(ExchangeError::Body(e.to_string())),
                Some(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => {
                        gathered += d.len();
                        if first.is_none() {
                            first = Some(d);
                        } else if !d.is_empty() {
                            more.push(d);
                        }
                        ended = body.is_end_stream();
                    }
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        ended = true;
                    }
                },
            }
        }
        let declared = match parts.headers.get(header::CONTENT_LENGTH) {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(ExchangeError::Request("invalid content-length"))?,
            ),
            None => None,
        };
        let (framing, add_length) = match declared {
            Some(n) => (Framing::Length(n), None),
            // The whole body is here: its length is known, and trailers are the only reason
            // to chunk it (HTTP/1.1 carries them only in the chunked encoding).
            None if ended && trailers.is_none() => {
                if gathered == 0 && !method_has_content(&parts.method) {
                    (Framing::Empty, None)
                } else {
                    (Framing::Length(gathered as u64), Some(gathered as u64))
                }
            }
            None => (Framing::Chunked, None),
        };
        if let Framing::Length(n) = framing
            && (gathered as u64 > n || (ended && (gathered as u64) < n))
        {
            return Err(ExchangeError::Request(
                "body length differs from content-length",
            ));
        }
        let mut wire = BytesMut::with_capacity(256 + parts.headers.len() * 48 + gathered);
        wire.put_slice(parts.method.as_str().as_bytes());
        wire.put_u8(b' ');
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        wire.put_slice(if target.is_empty() { "/" } else { target }.as_bytes());
        wire.put_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            put_field(&mut wire, name.as_str(), value.as_bytes());
        }
        if let Some(n) = add_length {
            wire.put_slice(b"content-length: ");
            wire.put_slice(itoa::Buffer::new().format(n).as_bytes());
            wire.put_slice(b"\r\n");
        }
        if framing == Framing::Chunked {
            wire.put_slice(b"transfer-encoding: chunked\r\n");
        }
        wire.put_slice(b"\r\n");
        for d in first.iter().chain(&more).filter(|d| !d.is_empty()) {
            if framing == Framing::Chunked {
                put_chunk_size(&mut wire, d.len());
                wire.put_slice(d);
                wire.put_slice(b"\r\n");
            } else {
                wire.put_slice(d);
            }
        }
        if ended && framing == Framing::Chunked {
            wire.put_slice(b"0\r\n");
            for (name, value) in trailers.iter().flatten() {
                put_field(&mut wire, name.as_str(), value.as_bytes());
            }
            wire.put_slice(b"\r\n");
        }
        let done = ended || matches!(framing, Framing::Length(n) if gathered as u64 == n);
        Ok(Self {
            wire: wire.freeze(),
            rest: (!done).then_some((body, framing, gathered as u64)),
            is_head: parts.method == Method::HEAD,
            idempotent: is_idempotent(&parts.method),
        })
    }

    /// Sends the request on `conn` and reads the response head. The response body reads on
    /// from the connection, which goes `home` once the body has ended cleanly.
    pub async fn send_on(
        mut self,
        mut conn: Conn,
        home: Weak<dyn Home>,
    ) -> Result<Response<AppBody>, SendFailed> {
        if let Err(e) = conn.io.write_all(&self.wire).await {
            // The app did not take the request whole: it cannot have acted on it.
            let retry = self.rest.is_none().then_some(self);
            return Err(SendFailed {
                error: e.into(),
                retry,
            });
        }
        let (reader, pump) = match self.rest.take() {
            None => (Either::Left(conn.io), None),
            Some((body, framing, sent)) => {
                let (read, write) = conn.io.into_split();
                let task = tokio::spawn(pump(write, body, framing, sent));
                (Either::Right(read), Some(task))
            }
        };
        let mut body = AppBody {
            reader: Some(reader),
            buf: conn.buf,
            state: State::Done,
            keep_alive: false,
            pump,
            home: Some(home),
        };
        match body.read_head(self.is_head).await {
            Ok(resp) => Ok(resp.map(|()| body)),
            Err(HeadError {
                error,
                nothing_read,
            }) => {
                // A connection the app closed just as the request went out: a request that
                // may be repeated goes out again (RFC 9110 §9.2.2); one that may not, never.
                let again = nothing_read && self.idempotent && body.pump.is_none();
                body.close();
                Err(SendFailed {
                    error,
                    retry: again.then_some(self),
                })
            }
        }
    }
}

/// `f`'s output if it is ready without waiting.
fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Whether a request with this method is defined to carry content, so that an empty one is
/// sent with `Content-Length: 0` (RFC 9110 §8.6).
fn method_has_content(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// RFC 9110 §9.2.2.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn put_field(wire: &mut BytesMut, name: &str, value: &[u8]) {
    wire.put_slice(name.as_bytes());
    wire.put_slice(b": ");
    wire.put_slice(value);
    wire.put_slice(b"\r\n");
}

fn put_chunk_size(wire: &mut BytesMut, n: usize) {
    let mut hex = [0u8; 16];
    let mut i = hex.len();
    let mut n = n;
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    wire.put_slice(&hex[i..]);
    wire.put_slice(b"\r\n");
}

/// Streams the rest of a request body to the app (`sent` bytes of it went with the head), and
/// hands the write half back when the body has ended as its framing says.
async fn pump(
    mut w: OwnedWriteHalf,
    mut body: Body,
    framing: Framing,
    mut sent: u64,
) -> Result<OwnedWriteHalf, PumpError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| PumpError::Body(e.to_string()))?;
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if framing == Framing::Chunked {
                    let mut last = BytesMut::from(&b"0\r\n"[..]);
                    if let Ok(trailers) = frame.into_trailers() {
                        for (name, value) in &trailers {
                            put_field(&mut last, name.as_str(), value.as_bytes());
                        }
                    }
                    last.put_slice(b"\r\n");
                    w.write_all(&last).await?;
                    return Ok(w);
                }
                break;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            Framing::Length(n) => {
                if sent > n {
                    return Err(PumpError::TooLong);
                }
                w.write_all(&data).await?;
                if sent == n {
                    // All the app will read: the end of the stream has nothing more to say.
                    return Ok(w);
                }
            }
            _ => {
                let mut size = BytesMut::with_capacity(18);
                put_chunk_size(&mut size, data.len());
                let mut chunk = size.freeze().chain(data).chain(&b"\r\n"[..]);
                w.write_all_buf(&mut chunk).await?;
            }
        }
    }
    match framing {
        Framing::Length(n) if sent < n => Err(PumpError::TooShort),
        Framing::Chunked => {
            w.write_all(b"0\r\n\r\n").await?;
            Ok(w)
        }
        _ => Ok(w),
    }
}

/// A failed read of the response head; `nothing_read` when the app sent not a byte of it.
struct HeadError {
    error: ExchangeError,
    nothing_read: bool,
}

impl<E: Into<ExchangeError>> From<E> for HeadError {
    fn from(e: E) -> Self {
        Self {
            error: e.into(),
            nothing_read: false,
        }
    }
}

/// What [`AppBody::parse_head`] found.
enum Parsed {
    /// The response head.
    Final(Response<()>),
    /// An interim (1xx) response, skipped.
    Interim,
    /// Not all of a head yet.
    Partial,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Eof,
    Done,
}

/// The body of a response from the app, read from its connection as it is polled.
pub struct AppBody {
    reader: Option<Either<TcpStream, OwnedReadHalf>>,
    buf: BytesMut,
    state: State,
    /// The connection may take another request once this body has ended.
    keep_alive: bool,
    /// The task streaming the request body, when there is one.
    pump: Option<JoinHandle<Result<OwnedWriteHalf, PumpError>>>,
    home: Option<Weak<dyn Home>>,
}

impl std::fmt::Debug for AppBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppBody")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl AppBody {
    /// Reads more of the response into `buf`: the number of bytes read, 0 at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_BYTES / 4 {
            self.buf.reserve(READ_BYTES);
        }
        let Some(reader) = self.reader.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        tokio_util::io::poll_read_buf(Pin::new(reader), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Reads the response head (skipping interim 1xx responses) and sets how the body is
    /// framed and whether the connection stays open after it.
    async fn read_head(&mut self, is_head: bool) -> Result<Response<()>, HeadError> {
        let mut nothing_read = self.buf.is_empty();
        loop {
            if !self.buf.is_empty() {
                nothing_read = false;
                match self.parse_head(is_head)? {
                    Parsed::Final(resp) => return Ok(resp),
                    // The final response may be right behind it.
                    Parsed::Interim => continue,
                    Parsed::Partial if self.buf.len() > MAX_HEAD_BYTES => {
                        return Err(ExchangeError::HeadTooLarge.into());
                    }
                    Parsed::Partial => {}
                }
            }
            match self.fill().await {
                Ok(0) => {
                    return Err(HeadError {
                        error: ExchangeError::Closed,
                        nothing_read,
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(HeadError {
                        error: e.into(),
                        nothing_read,
                    });
                }
            }
        }
    }

    /// The response head at the start of `buf`, if it is all there.
    fn parse_head(&mut self, is_head: bool) -> Result<Parsed, ExchangeError> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            &self.buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => return Err(ExchangeError::TooManyHeaders),
            Err(e) => return Err(ExchangeError::Parse(e)),
        };
        let code = parsed.code.unwrap_or(0);
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(ExchangeError::UnexpectedUpgrade);
            }
            self.buf.advance(len);
            return Ok(Parsed::Interim);
        }
        let http11 = parsed.version == Some(1);
        // Where each header sits in the head, so that the values can be slices of it.
        let base = self.buf.as_ptr() as usize;
        let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
        let count = parsed.headers.len();
        for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            let name = (h.name.as_ptr() as usize).wrapping_sub(base);
            let value = (h.value.as_ptr() as usize).wrapping_sub(base);
            *span = (name, name + h.name.len(), value, value + h.value.len());
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| ExchangeError::Parse(httparse::Error::Status))?;
        let head = self.buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &(n0, n1, v0, v1) in &spans[..count] {
            // httparse's slices are of the head (an empty value may point just past it).
            let (Some(name), true) = (head.get(n0..n1), v0 <= v1 && v1 <= len) else {
                return Err(ExchangeError::InvalidHeader("(outside the head)".into()));
            };
            let name = HeaderName::from_bytes(name)
                .map_err(|_| ExchangeError::InvalidHeader(String::from_utf8_lossy(name).into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
                .map_err(|_| ExchangeError::InvalidHeader(name.as_str().into()))?;
            headers.append(name, value);
        }
        let (framing, mut keep_alive) = response_framing(&headers, status, is_head)?;
        if framing == Framing::Chunked || framing == Framing::Eof {
            // The length is not what delimits the body (RFC 9112 §6.3: a Transfer-Encoding
            // overrides it, and an intermediary must remove it); passed on, it would frame
            // the HTTP/2 hop wrongly.
            headers.remove(header::CONTENT_LENGTH);
        }
        keep_alive &= connection_persists(&headers, http11);
        self.keep_alive = keep_alive;
        self.state = match framing {
            Framing::Empty => State::Length(0),
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Eof => State::Eof,
        };
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        if matches!(self.state, State::Length(0)) {
            self.finish();
        }
        Ok(Parsed::Final(resp))
    }

    /// The body has ended: the connection goes home when it can take another request, and
    /// is closed otherwise.
    fn finish(&mut self) {
        self.state = State::Done;
        let home = self.home.take();
        let reader = self.reader.take();
        let pump = self.pump.take();
        let (Some(home), Some(reader), true, true) = (
            home.and_then(|h| h.upgrade()),
            reader,
            self.keep_alive,
            self.buf.is_empty(),
        ) else {
            if let Some(p) = pump {
                p.abort();
            }
            return;
        };
        let io = match (reader, pump) {
            (Either::Left(io), None) => io,
            (Either::Right(read), Some(mut p)) => {
                // The app answered before the request body was through: the connection is
                // reusable only if it was, by now.
                match now_or_never(&mut p) {
                    Some(Ok(Ok(write))) => match read.reunite(write) {
                        Ok(io) => io,
                        Err(_) => return,
                    },
                    _ => {
                        p.abort();
                        return;
                    }
                }
            }
            _ => return,
        };
        // The buffer goes along: its allocation serves the next response once the bytes
        // handed out of it are dropped.
        home.put(Conn {
            io,
            buf: std::mem::take(&mut self.buf),
        });
    }

    /// Drops the connection (an exchange that failed).
    fn close(&mut self) {
        self.keep_alive = false;
        self.finish();
    }

    /// The next piece of a chunked body.
    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
        mut chunk: Chunk,
    ) -> Poll<Option<Result<Frame<Bytes>, AppBodyError>>> {
        loop {
            match chunk {
                Chunk::Size => match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        self.buf.advance(len);
                        chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                        continue;
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD_BYTES => {}
                    _ => return self.fail(AppBodyError::Chunked),
                },
                Chunk::Data(left) if !self.buf.is_empty() => {
                    let n = left.min(self.buf.len() as u64);
                    let data = self.buf.split_to(n as usize).freeze();
                    self.state = State::Chunked(if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    });
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Chunk::Data(_) => {}
                Chunk::DataEnd if self.buf.len() >= 2 => {
                    if &self.buf[..2] != b"\r\n" {
                        return self.fail(AppBodyError::Chunked);
                    }
                    self.buf.advance(2);
                    chunk = Chunk::Size;
                    continue;
                }
                Chunk::DataEnd => {}
                Chunk::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(&self.buf, &mut slots) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let trailers = fields
                                .iter()
                                .map(|f| {
                                    Some((
                                        HeaderName::from_bytes(f.name.as_bytes()).ok()?,
                                        HeaderValue::from_bytes(f.value).ok()?,
                                    ))
                                })
                                .collect::<Option<HeaderMap>>();
                            self.buf.advance(len);
                            let Some(trailers) = trailers else {
                                return self.fail(AppBodyError::Trailers);
                            };
                            self.finish();
                            return Poll::Ready(
                                (!trailers.is_empty()).then(|| Ok(Frame::trailers(trailers))),
                            );
                        }
                        Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD_BYTES => {}
                        _ => return self.fail(AppBodyError::Trailers),
                    }
                }
            }
            self.state = State::Chunked(chunk);
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return self.fail(AppBodyError::Closed),
                Ok(_) => {}
                Err(e) => return self.fail(e.into()),
            }
        }
    }

    fn fail(&mut self, e: AppBodyError) -> Poll<Option<Result<Frame<Bytes>, AppBodyError>>> {
        self.close();
        Poll::Ready(Some(Err(e)))
    }
}

/// How the response's body is delimited (RFC 9112 §6.3), and whether that leaves the
/// connection fit for another request.
fn response_framing(
    headers: &HeaderMap,
    status: StatusCode,
    is_head: bool,
) -> Result<(Framing, bool), ExchangeError> {
    if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, true));
    }
    if let Some(te) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let chunked = te
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        // With a Content-Length too, the message was meant to confuse: close after it.
        let clean = !headers.contains_key(header::CONTENT_LENGTH);
        return Ok(if chunked {
            (Framing::Chunked, clean)
        } else {
            (Framing::Eof, false)
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v
            .to_str()
            .map_err(|_| ExchangeError::InvalidContentLength)?
            .split(',')
        {
            let n = part
                .trim()
                .parse::<u64>()
                .map_err(|_| ExchangeError::InvalidContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::InvalidContentLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Eof, false),
    })
}

/// Whether the app keeps the connection open after this response.
fn connection_persists(headers: &HeaderMap, http11: bool) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            close |= token.eq_ignore_ascii_case("close");
            keep_alive |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    !close && (http11 || keep_alive)
}

impl HttpBody for AppBody {
    type Data = Bytes;
    type Error = AppBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AppBodyError>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(left) if !this.buf.is_empty() => {
                    let n = left.min(this.buf.len() as u64);
                    let data = this.buf.split_to(n as usize).freeze();
                    this.state = State::Length(left - n);
                    if n == left {
                        // The last byte: the connection can serve the next request already.
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Eof if !this.buf.is_empty() => {
                    let data = this.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(chunk) => return this.poll_chunked(cx, chunk),
                State::Length(_) | State::Eof => match ready!(this.poll_fill(cx)) {
                    Ok(0) if matches!(this.state, State::Eof) => {
                        this.close();
                        return Poll::Ready(None);
                    }
                    Ok(0) => return this.fail(AppBodyError::Closed),
                    Ok(_) => {}
                    Err(e) => return this.fail(e.into()),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for AppBody {
    fn drop(&mut self) {
        if !matches!(self.state, State::Done) {
            // Dropped before its end: the rest of the response would confuse the next one.
            self.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::app_pool::{AppConnector, Http1Pool};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// What the scripted app does with a request.
    enum Answer {
        /// Writes these bytes (one by one when `trickle`), then reads the next request.
        Reply(Vec<u8>),
        /// Writes these bytes, then closes the connection.
        ReplyAndClose(Vec<u8>),
        /// Closes the connection without a word.
        Close,
    }

    /// The scripted app's answer to a request, given its index on its connection and its head.
    type Script = Arc<dyn Fn(usize, &str) -> Answer + Send + Sync>;

    /// An app that reads request heads (and `content-length` bodies) and answers each as
    /// `script` says, given the request's index on its connection and its head. Counts the
    /// connections it accepts.
    async fn scripted_app(script: Script, trickle: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for index in 0.. {
                        let head = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                                buf.drain(..end + 4);
                                break head;
                            }
                            let mut chunk = [0u8; 4096];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|n| n.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        while buf.len() < length {
                            let mut chunk = [0u8; 4096];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..length);
                        let (answer, close) = match script(index, &head) {
                            Answer::Reply(a) => (a, false),
                            Answer::ReplyAndClose(a) => (a, true),
                            Answer::Close => return,
                        };
                        if trickle {
                            for b in answer {
                                if tcp.write_all(&[b]).await.is_err() {
                                    return;
                                }
                                tokio::task::yield_now().await;
                            }
                        } else if tcp.write_all(&answer).await.is_err() {
                            return;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn pool_for(addr: SocketAddr) -> Http1Pool {
        Http1Pool::new(AppConnector::new(addr, None, Duration::from_secs(5)))
    }

    fn request(method: Method, addr: SocketAddr, body: &'static str) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri("/path?q=1")
            .header(header::HOST, addr.to_string())
            .body(if body.is_empty() {
                Body::empty()
            } else {
                Body::text(body)
            })
            .expect("request")
    }

    /// Sends a request through `pool` and expects a response head.
    async fn send_ok(
        pool: &Http1Pool,
        method: Method,
        addr: SocketAddr,
        body: &'static str,
    ) -> Response<AppBody> {
        pool.send(request(method, addr, body))
            .await
            .expect("response")
    }

    /// The body's bytes and trailers.
    async fn read_all(resp: Response<AppBody>) -> (String, Option<HeaderMap>) {
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (
            String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailers,
        )
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
        5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\ngrpc-status: 0\r\nx-end: yes\r\n\r\n";

    #[tokio::test]
    async fn chunked_responses_with_trailers_arriving_byte_by_byte() {
        let (addr, accepted) =
            scripted_app(Arc::new(|_, _| Answer::Reply(CHUNKED.to_vec())), true).await;
        let pool = pool_for(addr);
        for _ in 0..3 {
            let resp = send_ok(&pool, Method::GET, addr, "").await;
            assert_eq!(resp.status(), StatusCode::OK);
            let (body, trailers) = read_all(resp).await;
            assert_eq!(body, "hello, world");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-end"], "yes");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
    }

    #[tokio::test]
    async fn the_request_goes_out_as_written_with_its_length() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let (addr, _) = scripted_app(
            Arc::new(move |_, head| {
                log.lock().expect("log").push(head.to_owned());
                Answer::Reply(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
            }),
            false,
        )
        .await;
        let pool = pool_for(addr);
        for (method, body) in [(Method::POST, "abc"), (Method::GET, ""), (Method::PUT, "")] {
            let resp = send_ok(&pool, method, addr, body).await;
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            assert_eq!(read_all(resp).await.0, "");
        }
        let seen = seen.lock().expect("log");
        assert!(
            seen[0].starts_with("POST /path?q=1 HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("content-length: 3\r\n"), "{}", seen[0]);
        assert!(
            !seen[1].contains("content-length"),
            "a GET without a body: {}",
            seen[1]
        );
        assert!(
            seen[2].contains("content-length: 0\r\n"),
            "an empty PUT: {}",
            seen[2]
        );
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_head_has_no_body() {
        let (addr, accepted) = scripted_app(
            Arc::new(|_, head| {
                Answer::Reply(if head.starts_with("HEAD") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec()
                } else {
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
                      HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
                        .to_vec()
                })
            }),
            false,
        )
        .await;
        let pool = pool_for(addr);
        let resp = send_ok(&pool, Method::POST, addr, "x").await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(read_all(resp).await.0, "ok");
        let resp = send_ok(&pool, Method::HEAD, addr, "").await;
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "1000");
        assert_eq!(read_all(resp).await.0, "");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_content_length_beside_transfer_encoding_is_dropped_and_the_connection_closed() {
        let (addr, accepted) = scripted_app(
            Arc::new(|_, _| {
                Answer::Reply(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 100\r\n\r\n\
                      5\r\nhello\r\n0\r\n\r\n"
                        .to_vec(),
                )
            }),
            false,
        )
        .await;
        let pool = pool_for(addr);
        for _ in 0..2 {
            let resp = send_ok(&pool, Method::GET, addr, "").await;
            assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
            assert_eq!(read_all(resp).await.0, "hello");
        }
        // Such a message was meant to confuse: its connection is not reused.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_delimited_by_close_is_read_to_the_end_and_not_reused() {
        let (addr, accepted) = scripted_app(
            Arc::new(|_, _| Answer::ReplyAndClose(b"HTTP/1.1 200 OK\r\n\r\nall of it".to_vec())),
            false,
        )
        .await;
        let pool = pool_for(addr);
        for _ in 0..2 {
            let resp = send_ok(&pool, Method::GET, addr, "").await;
            assert_eq!(read_all(resp).await.0, "all of it");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn the_connection_goes_back_with_the_last_byte() {
        let (addr, _) = scripted_app(
            Arc::new(|_, _| {
                Answer::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec())
            }),
            false,
        )
        .await;
        let pool = pool_for(addr);
        let resp = send_ok(&pool, Method::GET, addr, "").await;
        let mut body = resp.into_body();
        let frame = body.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "hello");
        assert!(body.is_end_stream());
        assert_eq!(pool.idle_count(), 1, "back before the body is even dropped");
    }

    #[tokio::test]
    async fn a_connection_the_app_drops_under_a_request_is_retried_only_when_idempotent() {
        // The second request on every connection meets a connection closed without a word.
        let (addr, accepted) = scripted_app(
            Arc::new(|i, _| {
                if i == 0 {
                    Answer::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
                } else {
                    Answer::Close
                }
            }),
            false,
        )
        .await;
        let pool = pool_for(addr);
        let resp = send_ok(&pool, Method::GET, addr, "").await;
        assert_eq!(read_all(resp).await.0, "ok");
        let resp = send_ok(&pool, Method::GET, addr, "").await;
        assert_eq!(read_all(resp).await.0, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let err = pool
            .send(request(Method::POST, addr, "once"))
            .await
            .expect_err("a POST is not sent twice");
        assert!(err.to_string().contains("closed the connection"), "{err}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn broken_responses_fail_with_a_reason() {
        let mut huge = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
        huge.resize(MAX_HEAD_BYTES + 1024, b'a');
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let cases: [(Vec<u8>, &str); 6] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n".to_vec(),
                "content-length",
            ),
            (b"SMTP ready\r\n\r\n".to_vec(), "invalid response head"),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(), "101"),
            (b"HTTP/1.1 200 OK\r\n".to_vec(), "closed the connection"),
            (huge, "response head over"),
            (many, "more than 100 response headers"),
        ];
        for (answer, reason) in cases {
            let answer = Arc::new(answer);
            let (addr, _) = scripted_app(
                Arc::new(move |_, _| Answer::ReplyAndClose(answer.to_vec())),
                false,
            )
            .await;
            let err = pool_for(addr)
                .send(request(Method::POST, addr, "x"))
                .await
                .expect_err("broken");
            assert!(err.to_string().contains(reason), "{err} lacks {reason}");
        }
    }

    #[tokio::test]
    async fn a_broken_chunk_fails_the_body_and_closes_the_connection() {
        let (addr, accepted) = scripted_app(
            Arc::new(|_, _| {
                Answer::Reply(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcdef\r\n"
                        .to_vec(),
                )
            }),
            false,
        )
        .await;
        let pool = pool_for(addr);
        let resp = send_ok(&pool, Method::GET, addr, "").await;
        let err = resp.into_body().collect().await.expect_err("broken chunk");
        assert!(matches!(err, AppBodyError::Chunked), "{err}");
        assert_eq!(pool.idle_count(), 0);
        drop(accepted);
    }

    /// A hyper server on loopback that serves each connection with `svc`.
    async fn hyper_server<S>(svc: S) -> SocketAddr
    where
        S: hyper::service::Service<Request<hyper::body::Incoming>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Response: Into<Response<Body>>,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let fut = svc.call(req);
                        async move { fut.await.map(Into::into) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_request_body_streams_while_the_response_comes_back() {
        use http_body_util::StreamBody;
        use hyper_util::rt::TokioIo;
        // The app echoes the request body as it arrives.
        let app = hyper_server(hyper::service::service_fn(
            |req: Request<hyper::body::Incoming>| async move {
                Ok::<_, std::convert::Infallible>(Response::new(Body::incoming(req.into_body())))
            },
        ))
        .await;
        // A front that forwards each request through the pool, as the inbound does.
        let pool = pool_for(app);
        let front_pool = pool.clone();
        let front = hyper_server(hyper::service::service_fn(
            move |req: Request<hyper::body::Incoming>| {
                let pool = front_pool.clone();
                async move {
                    let (mut parts, body) = req.into_parts();
                    crate::http::strip_hop_by_hop(&mut parts.headers);
                    let resp = pool
                        .send(Request::from_parts(parts, Body::incoming(body)))
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(resp.map(Body::app))
                }
            },
        ))
        .await;
        let tcp = TcpStream::connect(front).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = Request::post("/echo")
            .header(header::HOST, "app")
            .body(body)
            .expect("request");
        let resp = sender.send_request(req);
        // Each piece must come back before the next is sent: the response streams while the
        // request body is still open.
        tx.send(Ok(Frame::data(Bytes::from_static(b"ping 0"))))
            .await
            .expect("send");
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("head in time")
            .expect("response");
        let mut echoed = resp.into_body();
        for i in 0..5 {
            if i > 0 {
                tx.send(Ok(Frame::data(Bytes::from(format!("ping {i}")))))
                    .await
                    .expect("send");
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), echoed.frame())
                .await
                .expect("echo in time")
                .expect("frame")
                .expect("data");
            assert_eq!(frame.into_data().expect("data"), format!("ping {i}"));
        }
        drop(tx);
        let rest = echoed.collect().await.expect("end").to_bytes();
        assert!(rest.is_empty());
        // The chunked request ended cleanly, and so did the response: the connection is back.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle_count(), 1);
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, text) in [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (4096, "1000\r\n"),
            (255, "ff\r\n"),
        ] {
            let mut out = BytesMut::new();
            put_chunk_size(&mut out, n);
            assert_eq!(&out[..], text.as_bytes());
        }
    }
}
