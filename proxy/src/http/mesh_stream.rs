//! One request or tunnel as an HTTP/2 stream on a pooled mesh connection, driven through the
//! `h2` crate directly.
//!
//! Why not hyper's HTTP/2 client: it hands every request to the connection's task over a
//! channel, spawns a task per request to wait for the response head, and answers over a
//! oneshot: three hand-offs and a task per request, a few hundred nanoseconds each on the
//! hottest path the proxy has. Here the request's own task opens the stream, awaits the
//! head and reads the body; only a request body that is still streaming gets a task
//! (`pump`) to move it into the stream. On the inbound side hyper's HTTP/2 server stays.
//!
//! - [`MeshSender`] opens streams on one connection ([`crate::http::pool`] drives the
//!   connection itself and marks it closed when it ends).
//! - [`MeshSender::send`] sends a request and waits for the response head; the response body
//!   is a [`RecvStream`] that [`crate::http::body::Body`] forwards with its trailers.
//! - [`MeshSender::open`] opens a CONNECT stream; [`StreamIo`] is its byte stream (tunnels:
//!   Upgrade/WebSocket, CONNECT and opaque TCP).
//! - A [`StreamGuard`] counts each stream on its connection while the response body or the
//!   tunnel lives, so that the connection's keep-alive pings only while it carries streams.

use crate::http::body::Body;
use crate::http::coalesce::Coalesce;
use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};
use hyper::body::Body as HttpBody;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the pool and a connection's task know of it: whether it has ended, and how many
/// streams are open on it (its keep-alive pings only then).
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    closed: AtomicBool,
    streams: AtomicUsize,
    /// The peer's stream limit as last read (0: not read yet); see [`MeshSender::has_room`].
    max_streams: AtomicUsize,
}

impl ConnState {
    /// Whether any stream is open.
    pub(crate) fn has_streams(&self) -> bool {
        self.streams.load(Ordering::Relaxed) > 0
    }

    /// Whether the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection as ended.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// One open stream, counted on its connection until dropped: held by the response body or
/// the tunnel.
#[derive(Debug)]
pub struct StreamGuard {
    state: Arc<ConnState>,
    /// Chunks of request body sent by the stream's pump task, when it has one: activity on
    /// the stream for the response body's stream idle timeout.
    sent: Option<Arc<AtomicU64>>,
}

impl StreamGuard {
    fn new(state: &Arc<ConnState>) -> Self {
        state.streams.fetch_add(1, Ordering::Relaxed);
        Self {
            state: state.clone(),
            sent: None,
        }
    }

    /// Chunks of request body sent so far by the stream's pump task (0 without one).
    pub(crate) fn request_chunks(&self) -> u64 {
        self.sent.as_ref().map_or(0, |s| s.load(Ordering::Relaxed))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens streams on one pooled mesh connection. Clones share the connection.
#[derive(Clone)]
pub struct MeshSender {
    tx: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

impl std::fmt::Debug for MeshSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSender")
            .field("closed", &self.state.is_closed())
            .finish_non_exhaustive()
    }
}

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection could take no new stream (it closed, or is going away): the request
    /// did not go out and may go to another endpoint.
    #[error("the connection takes no new streams: {source}")]
    Unsent {
        /// The request, untouched.
        request: Box<Request<Body>>,
        /// Why.
        source: h2::Error,
    },
    /// The stream failed after the request went out (or could not go out as it was): it is
    /// not retried, as it may not be idempotent.
    #[error("stream failed: {0}")]
    Failed(#[from] h2::Error),
    /// No response head within the [`RequestTimeout`]; the stream is reset.
    #[error("no response within the request timeout")]
    TimedOut,
}

/// How long a request waits for its response head: `limit` from the end of the request, as
/// Envoy's route timeout runs from the end of the downstream request. That is its arrival
/// (`began`) for a request whose body is over by the time its head goes out (no body, or a
/// small one such as a gRPC unary call's), and the moment the rest of its body has gone out
/// otherwise: a client stream or a slow upload is not cut while it is still sending. While it
/// is sending, `idle` bounds it instead: a body that moves no chunk for that long (a client
/// that stopped, a peer that reads no more and answers nothing) ends the wait.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeout {
    /// When the request arrived.
    pub began: std::time::Instant,
    /// How long after its end the response head may take.
    pub limit: Duration,
    /// How long its body may move nothing while it is being sent (the stream idle timeout).
    pub idle: Duration,
}

/// How often a connection with streams open checks that its peer still answers (PING), and
/// how long the answer may take before the connection is given up (its streams fail).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// See [`KEEP_ALIVE_INTERVAL`].
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl MeshSender {
    /// Handshakes HTTP/2 (prior knowledge) over `io`, as weft's clients do, to a peer proxy
    /// and to an h2c app alike, and drives the connection with [`MeshSender::spawn`].
    pub async fn handshake<T, K>(io: T, peer: SocketAddr, keep: K) -> Result<Self, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        K: Send + 'static,
    {
        let (tx, conn) = h2::client::Builder::new()
            // Fixed windows: adaptive windows cost a PING per data burst, and the
            // bandwidth-delay product to a peer proxy or a local app is small.
            .initial_window_size(crate::http::STREAM_WINDOW)
            .initial_connection_window_size(crate::http::CONNECTION_WINDOW)
            .max_header_list_size(crate::http::MAX_HEADER_BYTES as u32)
            .max_send_buffer_size(1024 * 1024)
            .enable_push(false)
            // Each turn of the connection goes out in one write (see `coalesce`).
            .handshake::<_, Bytes>(Coalesce::new(io))
            .await?;
        Ok(Self::spawn(tx, conn, peer, keep))
    }

    /// Drives a handshaken connection in a task of its own (which also holds `keep`), with
    /// keep-alive PINGs, until it ends; the sender then reports it closed. `peer` names the
    /// connection in logs.
    pub fn spawn<T, K>(
        tx: SendRequest<Bytes>,
        mut conn: h2::client::Connection<T, Bytes>,
        peer: SocketAddr,
        keep: K,
    ) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        K: Send + 'static,
    {
        let state = Arc::new(ConnState::default());
        let pings = conn.ping_pong();
        let task_state = state.clone();
        tokio::spawn(async move {
            let _keep = keep;
            let keep_alive = keep_alive(pings, &task_state);
            tokio::select! {
                // The connection is what wakes this task nearly every time.
                biased;
                ended = &mut conn => {
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "HTTP/2 connection ended");
                    }
                }
                () = keep_alive => {
                    tracing::info!(%peer, "HTTP/2 connection: no PING answer; closing it");
                }
            }
            task_state.close();
        });
        Self { tx, state }
    }

    /// Whether streams are open on the connection (requests whose response bodies live, and
    /// tunnels).
    pub fn has_streams(&self) -> bool {
        self.state.has_streams()
    }

    /// Whether the connection has ended (or refuses new streams).
    pub fn is_closed(&self) -> bool {
        self.state.is_closed()
    }

    /// How many streams are open on the connection.
    pub fn streams(&self) -> usize {
        self.state.streams.load(Ordering::Relaxed)
    }

    /// Whether another stream may open now under the peer's limit (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`). The limit is read again (under h2's connection
    /// lock) only when the open streams reach the one read last, not for every request.
    pub fn has_room(&self) -> bool {
        let open = self.streams();
        if open < self.state.max_streams.load(Ordering::Relaxed) {
            return true;
        }
        let max = self.tx.current_max_send_streams();
        self.state.max_streams.store(max, Ordering::Relaxed);
        open < max
    }

    /// Sends `req` on a new stream and waits for the response head. A request body that is
    /// not over with the head is moved into the stream by a task of its own, so that the
    /// response can stream back meanwhile (gRPC bidirectional streaming); it is cancelled,
    /// and the stream reset, when the head never comes (this future dropped or failed). The
    /// stream counts as open on the connection as long as the returned guard lives.
    ///
    /// Connection-specific headers must already be gone (HTTP/2 has none; see
    /// [`crate::http::strip_hop_by_hop`]).
    ///
    /// With a [`RequestTimeout`], waiting for room on the connection and for the response
    /// head are bounded by it ([`SendError::TimedOut`]).
    pub async fn send(
        self,
        req: Request<Body>,
        timeout: Option<RequestTimeout>,
    ) -> Result<(Response<RecvStream>, StreamGuard), SendError> {
        let Self { tx, state } = self;
        let deadline = timeout.map(|t| crate::http::request_deadline(t.began, t.limit));
        // A connection with room is ready at the first poll: the deadline's timer is set up
        // only when the request has to wait for a stream.
        let mut ready = std::pin::pin!(tx.ready());
        let ready = match (futures::poll!(ready.as_mut()), deadline) {
            (Poll::Ready(ready), _) => ready,
            (Poll::Pending, Some(deadline)) => {
                match tokio::time::timeout_at(deadline, ready).await {
                    Ok(ready) => ready,
                    Err(_) => return Err(SendError::TimedOut),
                }
            }
            (Poll::Pending, None) => ready.await,
        };
        let mut tx = match ready {
            Ok(tx) => tx,
            Err(source) => {
                // `ready` fails only when the connection is gone or going away: no stream
                // will open on it again, so the pool stops handing it out before its task
                // has ended.
                state.close();
                return Err(SendError::Unsent {
                    request: Box::new(req),
                    source,
                });
            }
        };
        let (head, body) = req.into_parts();
        let end_of_stream = body.is_end_stream();
        let (response, stream) = tx.send_request(Request::from_parts(head, ()), end_of_stream)?;
        let mut guard = StreamGuard::new(&state);
        let mut pumping = if end_of_stream {
            None
        } else {
            start_pump(Pump {
                body,
                stream,
                pending: None,
                unmetered: 0,
                sent: None,
            })
        };
        if let Some((_, sent)) = &pumping {
            guard.sent = Some(sent.clone());
        }
        let response = match (timeout, deadline, pumping.as_mut()) {
            (None, ..) | (_, None, _) => response.await?,
            (Some(_), Some(deadline), None) => tokio::time::timeout_at(deadline, response)
                .await
                .map_err(|_| SendError::TimedOut)??,
            (Some(t), Some(_), Some((pump, sent))) => {
                // The clock starts when the body is all sent; a response head that comes
                // first (a bidirectional stream) ends the wait without it. Meanwhile a body
                // that stops moving ends it.
                let mut response = std::pin::pin!(response);
                tokio::select! {
                    biased;
                    head = &mut response => head?,
                    _ = pump.finished() => {
                        let deadline = crate::http::request_deadline(std::time::Instant::now(), t.limit);
                        tokio::time::timeout_at(deadline, response)
                            .await
                            .map_err(|_| SendError::TimedOut)??
                    }
                    () = stalled(sent, t.idle) => return Err(SendError::TimedOut),
                }
            }
        };
        if let Some((p, _)) = pumping {
            p.detach();
        }
        Ok((response, guard))
    }

    /// Opens a CONNECT stream (`req`'s method must be CONNECT; an extended CONNECT carries
    /// its [`h2::ext::Protocol`] in the extensions) and waits for the answer's head. On a 2xx
    /// the stream is the tunnel: [`StreamIo::new`] over the two halves.
    pub async fn open(self, req: Request<()>) -> Result<OpenStream, h2::Error> {
        let Self { tx, state } = self;
        let mut tx = tx.ready().await.inspect_err(|_| state.close())?;
        let (response, send) = tx.send_request(req, false)?;
        let guard = StreamGuard::new(&state);
        let response = response.await?;
        Ok(OpenStream {
            response,
            send,
            guard,
        })
    }
}

/// An answered CONNECT stream.
#[derive(Debug)]
pub struct OpenStream {
    /// The answer's head, and the peer's half of the stream.
    pub response: Response<RecvStream>,
    /// Our half of the stream.
    pub send: SendStream<Bytes>,
    /// Counts the stream on its connection.
    pub guard: StreamGuard,
}

impl OpenStream {
    /// The stream as a byte stream (after a 2xx).
    pub fn into_io(self) -> StreamIo {
        StreamIo::new(self.send, self.response.into_body(), self.guard)
    }
}

/// Returns when the peer fails to answer a PING within [`KEEP_ALIVE_TIMEOUT`]. Pings only
/// while streams are open, so that an idle connection stays idle (and its peer may close it).
async fn keep_alive(pings: Option<h2::PingPong>, conn: &ConnState) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        if !conn.has_streams() {
            continue;
        }
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => {
                // The connection itself failed; its own future reports that.
                tracing::debug!(error = %e, "PING failed");
                return std::future::pending().await;
            }
            Err(_) => return,
        }
    }
}

/// Aborts a task when dropped, unless detached first.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Resolves when the task has ended (at once when it was detached).
    async fn finished(&mut self) {
        if let Some(task) = self.0.as_mut() {
            let _ = task.await;
            self.0 = None;
        }
    }

    /// Lets the task run on by itself. (Dropping a `JoinHandle` detaches its task and frees
    /// the handle's claim on the task's memory; forgetting it would leak that memory.)
    fn detach(mut self) {
        self.0.take();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Starts moving a request body into its stream. What the body has at hand goes now, in the
/// request's task, with the head: a body that is over by then (a gRPC unary request: one
/// DATA frame that ends the stream) needs no task, and its frames leave in the same write as
/// the head. The rest moves in a task of its own, returned to be cancelled if the response
/// head never comes.
fn start_pump<B>(mut pump: Pump<B>) -> Option<(AbortOnDrop, Arc<AtomicU64>)>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    // h2 opens a new stream, and only then gives it flow-control credit, in the connection's
    // task: a first chunk this small is buffered on the stream without waiting for credit.
    pump.unmetered = INLINE_BODY;
    // A poll that nothing wakes: if the body is not over, the task polls again at once and
    // registers its own waker before it waits.
    match Pin::new(&mut pump).poll(&mut Context::from_waker(std::task::Waker::noop())) {
        Poll::Ready(done) => {
            log_pumped(done);
            None
        }
        Poll::Pending => {
            pump.unmetered = 0;
            let sent = Arc::new(AtomicU64::new(0));
            pump.sent = Some(sent.clone());
            let task = AbortOnDrop(Some(tokio::spawn(async move {
                log_pumped(pump.await);
            })));
            Some((task, sent))
        }
    }
}

/// Resolves once `sent` has not moved for `idle` (looked at every eighth of it).
async fn stalled(sent: &AtomicU64, idle: Duration) {
    let period = crate::http::idle::Quiet::period(idle)
        .clamp(Duration::from_millis(1), Duration::from_secs(86_400));
    let mut quiet = crate::http::idle::Quiet::from(sent.load(Ordering::Relaxed));
    loop {
        tokio::time::sleep(period).await;
        if quiet.idle_at(sent.load(Ordering::Relaxed)) {
            return;
        }
    }
}

/// The most bytes of request body [`start_pump`] sends with the head, before the stream has
/// credit: one default-sized DATA frame.
const INLINE_BODY: usize = 16 * 1024;

fn log_pumped(done: Result<(), PumpError>) {
    if let Err(e) = done {
        tracing::debug!(error = %e, "request body not sent whole");
    }
}

/// Moves a request body into its stream: data as flow control allows, then the trailers or
/// the end of the stream. A body error, or the peer resetting the stream, ends it; the
/// stream is then reset (dropping the last handle of an unfinished stream resets it).
struct Pump<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A chunk taken from the body, waiting for flow-control capacity; with whether the
    /// body ended with it.
    pending: Option<(Bytes, bool)>,
    /// A chunk up to this size goes without waiting for capacity (see [`start_pump`]).
    unmetered: usize,
    /// Counts the chunks handed to the stream, once the pump runs in a task of its own.
    sent: Option<Arc<AtomicU64>>,
}

#[derive(Debug, thiserror::Error)]
enum PumpError {
    #[error("the peer reset the stream: {0}")]
    Reset(Reason),
    #[error("stream: {0}")]
    Stream(#[from] h2::Error),
    #[error("the stream can take no more data")]
    Closed,
    #[error("request body: {0}")]
    Body(String),
}

impl<B> std::future::Future for Pump<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Output = Result<(), PumpError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            // Registered on every pass, so a reset wakes the task whatever it waits for.
            if let Poll::Ready(r) = this.stream.poll_reset(cx) {
                return Poll::Ready(Err(r.map_or_else(PumpError::Stream, PumpError::Reset)));
            }
            if let Some((chunk, end)) = this.pending.take() {
                // `poll_capacity` is ready only when credit was added since it was last
                // polled, so it is asked only while the stream has none.
                while this.stream.capacity() == 0 && chunk.len() > this.unmetered {
                    match this.stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(None) => return Poll::Ready(Err(PumpError::Closed)),
                        Poll::Pending => {
                            this.pending = Some((chunk, end));
                            return Poll::Pending;
                        }
                    }
                }
                // The whole chunk goes, and h2 sends what the window allows now and the rest
                // as credit comes; the next chunk waits until this one is out, so one chunk
                // is all a slow peer makes the proxy hold.
                this.unmetered = 0;
                this.stream.send_data(chunk, end)?;
                if let Some(sent) = &this.sent {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => {
                    this.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => {
                    this.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(PumpError::Body(e.to_string())));
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(chunk) => {
                    let end = this.body.is_end_stream();
                    if chunk.is_empty() {
                        if end {
                            this.stream.send_data(Bytes::new(), true)?;
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // Capacity is asked for only with a chunk in hand, and only a byte of
                    // it (h2 raises the claim to what `send_data` buffers): a claim made
                    // ahead of the data would pin connection credit that other streams may
                    // be waiting for.
                    this.stream.reserve_capacity(1);
                    this.pending = Some((chunk, end));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        this.stream.reserve_capacity(0);
                        this.stream.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

/// The byte stream of an open CONNECT stream: what is read is the peer's DATA, what is
/// written goes out as DATA within flow control, and shutting down the write side sends
/// `END_STREAM` (half-close).
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received data not yet read.
    unread: Bytes,
    /// Whether `END_STREAM` went out.
    shut: bool,
    _guard: StreamGuard,
}

impl std::fmt::Debug for StreamIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamIo")
            .field("unread", &self.unread.len())
            .field("shut", &self.shut)
            .finish_non_exhaustive()
    }
}

/// An HTTP/2 stream error as an I/O error, for the copy loops.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl StreamIo {
    /// Resets the stream with `reason` (RST_STREAM), unless it already ended.
    pub(crate) fn reset(&mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }

    /// The two halves of an open stream as one byte stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, guard: StreamGuard) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            shut: false,
            _guard: guard,
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.unread = data,
                // The peer closing its side without error is the end of the byte stream.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        // Credit goes back as the reader takes the bytes, so a reader that stops holds the
        // peer to one window of unread data.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            let credit = this.send.capacity();
            if credit > 0 {
                let n = credit.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io_error)?;
                return Poll::Ready(Ok(n));
            }
            // Ready only when credit was added since the last poll: asked only with none.
            match this.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io_error(e))),
                Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Poll::Pending => {
                    // A reset while waiting for credit would otherwise never wake us.
                    return match this.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            h2::Error::from(reason),
                        ))),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(io_error(e))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sent data sits in the connection's buffer, which its task writes out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            this.shut = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method, StatusCode};
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    type Reply = h2::server::SendResponse<Bytes>;

    /// Moves `body` into `stream` until it is over (in the caller's task).
    async fn pump<B>(body: B, stream: SendStream<Bytes>)
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        log_pumped(
            Pump {
                body,
                stream,
                pending: None,
                unmetered: 0,
                sent: None,
            }
            .await,
        );
    }

    /// A POST to `path`, ready for a body on its stream.
    async fn post(
        sender: &MeshSender,
        path: &str,
    ) -> (h2::client::ResponseFuture, SendStream<Bytes>) {
        let mut tx = sender.tx.clone().ready().await.unwrap();
        let mut head = Request::new(());
        *head.method_mut() = Method::POST;
        *head.uri_mut() = format!("http://backend.mesh{path}").parse().unwrap();
        tx.send_request(head, false).unwrap()
    }

    #[tokio::test]
    async fn a_body_at_hand_goes_with_the_head_without_a_task() {
        let (sender, _state, _server) = connect(count_and_echo_trailers).await;
        let (response, stream) = post(&sender, "/unary").await;
        let pumping = start_pump(Pump {
            body: Body::text("hello"),
            stream,
            pending: None,
            unmetered: 0,
            sent: None,
        });
        assert!(pumping.is_none(), "a body that is all here needs no task");
        let response = within(response).await.unwrap();
        let (data, _) = within(read_all(response.into_body())).await.unwrap();
        assert_eq!(data, b"5");
    }

    #[tokio::test]
    async fn a_body_that_is_not_here_yet_goes_from_a_task() {
        let (sender, _state, _server) = connect(count_and_echo_trailers).await;
        let (response, stream) = post(&sender, "/stream").await;
        let first = futures::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
            Bytes::from_static(b"now"),
        ))]);
        let later = futures::stream::once(Box::pin(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Frame::data(Bytes::from_static(b" and later")))
        }));
        let body = StreamBody::new(futures::StreamExt::chain(first, later));
        let pumping = start_pump(Pump {
            body,
            stream,
            pending: None,
            unmetered: 0,
            sent: None,
        });
        let (task, sent) = pumping.expect("the rest of the body moves in a task");
        let response = within(response).await.unwrap();
        task.detach();
        let (data, _) = within(read_all(response.into_body())).await.unwrap();
        assert_eq!(data, b"13");
        assert_eq!(
            sent.load(Ordering::Relaxed),
            1,
            "one chunk went from the task"
        );
    }

    /// A client connection over an in-memory pipe to a test server whose `respond` gets each
    /// request; the connection's task marks the state closed when it ends.
    async fn connect<F, Fut>(
        respond: F,
    ) -> (MeshSender, Arc<ConnState>, tokio::task::JoinHandle<()>)
    where
        F: Fn(Request<RecvStream>, Reply) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve(theirs, respond));
        let (tx, conn) = h2::client::handshake(ours).await.unwrap();
        let sender = MeshSender::spawn(tx, conn, ([127, 0, 0, 1], 1).into(), ());
        let state = sender.state.clone();
        (sender, state, server)
    }

    async fn serve<F, Fut>(io: DuplexStream, respond: F)
    where
        F: Fn(Request<RecvStream>, Reply) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut conn = h2::server::Builder::new()
            // Small windows, so that a body has to wait for credit.
            .initial_window_size(16 * 1024)
            .initial_connection_window_size(32 * 1024)
            .enable_connect_protocol()
            .handshake::<_, Bytes>(io)
            .await
            .unwrap();
        while let Some(Ok((req, reply))) = conn.accept().await {
            tokio::spawn(respond(req, reply));
        }
    }

    /// A stream's whole body and its trailers, giving the credit back as it reads.
    async fn read_all(mut body: RecvStream) -> Result<(Vec<u8>, Option<HeaderMap>), h2::Error> {
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        Ok((data, body.trailers().await?))
    }

    /// Runs `f`, failing the test after 10 s instead of hanging it (a flow-control bug would
    /// wait forever).
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("the test timed out")
    }

    fn trailers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(name, HeaderValue::from_static(value));
        t
    }

    /// Answers with the request body's length, then the request's trailers.
    async fn count_and_echo_trailers(req: Request<RecvStream>, mut reply: Reply) {
        let (data, trailers) = read_all(req.into_body()).await.unwrap();
        let mut stream = reply.send_response(Response::new(()), false).unwrap();
        stream
            .send_data(Bytes::from(data.len().to_string()), false)
            .unwrap();
        stream.send_trailers(trailers.unwrap_or_default()).unwrap();
    }

    #[tokio::test]
    async fn a_request_body_larger_than_the_window_goes_whole_with_its_trailers() {
        let (sender, _state, _server) = connect(count_and_echo_trailers).await;
        // 1 MiB in 64 KiB chunks against a 16 KiB stream window, then trailers.
        let frames = (0..16)
            .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![7u8; 65536]))))
            .chain(std::iter::once(Ok(Frame::trailers(trailers(
                "x-checksum",
                "abc",
            )))))
            .collect::<Vec<_>>();
        let body = StreamBody::new(futures::stream::iter(frames));
        let (response, stream) = post(&sender, "/upload").await;
        tokio::spawn(pump(body, stream));
        let response = within(response).await.unwrap();
        let (data, trailers) = within(read_all(response.into_body())).await.unwrap();
        assert_eq!(data, b"1048576");
        assert_eq!(trailers.unwrap()["x-checksum"], "abc");
    }

    #[tokio::test]
    async fn a_failing_request_body_resets_the_stream() {
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        let (sender, _state, _server) = connect(move |req: Request<RecvStream>, _reply| {
            let tx = seen_tx.lock().unwrap().take();
            async move {
                let got = read_all(req.into_body()).await;
                if let Some(tx) = tx {
                    let _ = tx.send(got.err().and_then(|e| e.reason()));
                }
            }
        })
        .await;
        let frames: Vec<Result<Frame<Bytes>, &str>> = vec![
            Ok(Frame::data(Bytes::from_static(b"partial"))),
            Err("the app went away"),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        let (_response, stream) = post(&sender, "/upload").await;
        within(pump(body, stream)).await;
        let reason = within(seen_rx).await.unwrap();
        assert_eq!(reason, Some(Reason::CANCEL));
    }

    #[tokio::test]
    async fn send_gives_the_response_and_counts_the_stream_while_its_body_lives() {
        let (sender, state, _server) =
            connect(|req: Request<RecvStream>, mut reply: Reply| async move {
                assert_eq!(req.uri().path(), "/echo");
                let mut stream = reply.send_response(Response::new(()), false).unwrap();
                stream
                    .send_data(Bytes::from_static(b"hello"), false)
                    .unwrap();
                stream.send_trailers(trailers("grpc-status", "0")).unwrap();
            })
            .await;
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = "http://backend.mesh/echo".parse().unwrap();
        let (response, open) = within(sender.send(req, None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(state.has_streams());
        let body = Body::stream(response.into_body(), Some(open));
        let collected = within(body.collect()).await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "hello");
        assert!(
            !state.has_streams(),
            "the body is gone, and with it the stream's count"
        );
    }

    #[tokio::test]
    async fn a_request_on_a_connection_that_ended_comes_back_unsent() {
        let (sender, state, server) = connect(|_req, _reply: Reply| async {}).await;
        server.abort();
        for _ in 0..200 {
            if state.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(state.is_closed());
        let mut req = Request::new(Body::text("payload"));
        *req.method_mut() = Method::PUT;
        *req.uri_mut() = "http://backend.mesh/item".parse().unwrap();
        match within(sender.send(req, None)).await {
            Err(SendError::Unsent { request, .. }) => {
                assert_eq!(request.method(), Method::PUT);
                assert_eq!(request.uri().path(), "/item");
            }
            other => panic!("expected the request back, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connect_stream_carries_bytes_both_ways_and_half_closes() {
        let (sender, state, _server) =
            connect(|req: Request<RecvStream>, mut reply: Reply| async move {
                assert_eq!(req.method(), Method::CONNECT);
                let protocol = req.extensions().get::<h2::ext::Protocol>().cloned();
                assert_eq!(protocol.as_ref().map(|p| p.as_str()), Some("weft-tcp"));
                let mut stream = reply.send_response(Response::new(()), false).unwrap();
                // Everything up to the client's END_STREAM, then the answer and our own end.
                let (data, _) = read_all(req.into_body()).await.unwrap();
                stream
                    .send_data(Bytes::from(data.to_ascii_uppercase()), true)
                    .unwrap();
            })
            .await;
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = "http://10.0.0.1:8080/".parse().unwrap();
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("weft-tcp"));
        let opened = within(sender.open(req)).await.unwrap();
        assert_eq!(opened.response.status(), StatusCode::OK);
        let mut io = opened.into_io();
        // More than the 16 KiB window: the writes wait for credit.
        let sent = vec![b'a'; 100_000];
        within(io.write_all(&sent)).await.unwrap();
        within(io.shutdown()).await.unwrap();
        let mut got = Vec::new();
        within(io.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, vec![b'A'; 100_000]);
        assert!(state.has_streams());
        drop(io);
        assert!(!state.has_streams());
    }

    /// A server that answers one request's head (leaving its body open) and then, unless
    /// `keep_serving`, stops reading its connection, as a peer that hangs would.
    async fn answer_then_hang(io: DuplexStream, keep_serving: bool) {
        let mut conn = h2::server::handshake(io).await.unwrap();
        let Some(Ok((_req, mut reply))) = conn.accept().await else {
            return;
        };
        let _open = reply.send_response(Response::new(()), false).unwrap();
        // Long enough for the head to go out, in paused time.
        let _ = tokio::time::timeout(Duration::from_millis(100), conn.accept()).await;
        if keep_serving {
            while conn.accept().await.is_some() {}
        }
        std::future::pending::<()>().await;
    }

    /// A sender (held as the pool holds it) with one stream open on a peer.
    async fn open_stream_to(keep_serving: bool) -> (MeshSender, Arc<ConnState>, Body) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(answer_then_hang(theirs, keep_serving));
        let (tx, conn) = h2::client::handshake(ours).await.unwrap();
        let sender = MeshSender::spawn(tx, conn, ([127, 0, 0, 1], 1).into(), ());
        let state = sender.state.clone();
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = "http://backend.mesh/long-poll".parse().unwrap();
        let (response, open) = sender.clone().send(req, None).await.unwrap();
        (
            sender,
            state,
            Body::stream(response.into_body(), Some(open)),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_loses_the_connection() {
        let (_sender, state, _body) = open_stream_to(false).await;
        tokio::time::sleep(KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT / 2).await;
        assert!(!state.is_closed(), "the answer still has time");
        tokio::time::sleep(KEEP_ALIVE_TIMEOUT).await;
        assert!(state.is_closed(), "no PING answer within the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_pings_keeps_the_connection() {
        let (_sender, state, _body) = open_stream_to(true).await;
        tokio::time::sleep(3 * (KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT)).await;
        assert!(!state.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_not_pinged() {
        let (_sender, state, body) = open_stream_to(false).await;
        // The stream is gone: nothing to ping for, so the hanging peer goes unnoticed.
        drop(body);
        assert!(!state.has_streams());
        tokio::time::sleep(3 * (KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT)).await;
        assert!(!state.is_closed());
    }
}
