//! One write per turn of an HTTP/2 connection, however many frames the turn produced.
//!
//! h2 hands a DATA frame's payload to the I/O without copying it, and so writes and flushes
//! the I/O before it takes the next frame. Under TLS every flush is a TLS record and a
//! `writev`, and with `TCP_NODELAY` a TCP segment of its own: a proxy that answered eight
//! requests in one wake-up sent its peer eight records in eight segments, and the peer
//! processed eight.
//!
//! [`Coalesce`] copies the frames into one buffer and puts the flush off until the next turn
//! of the connection's task. The first flush of a turn that finds bytes waiting wakes the
//! task and returns at once, as do the turn's further flushes. The runtime polls the task
//! again after the other tasks that are ready now, which may add frames of their own, and
//! that turn's first read writes and flushes everything gathered.
//!
//! Nothing is left behind, because of how h2 drives its connection: an open connection reads
//! at the start of every turn, before it writes; a turn that ends before reading has stopped
//! on a write the socket did not take, and the socket wakes the task when it has room; and a
//! closing connection shuts the I/O down, which writes what is waiting first.
//!
//! Only h2 drives I/O that way, so only HTTP/2 connections are wrapped: the pooled ones
//! between proxies ([`super::pool`]), the ones the proxies serve (from peers, and from apps
//! that speak h2), and the inbound's h2c connections to its app
//! ([`super::app_h2c`]). HTTP/1.1 writes each response in one `writev`
//! already, and a tunnel's copy loop may wait on its other side after a flush, where a
//! put-off flush would stall.
//!
//! The cost is one more poll of the connection task per turn that wrote, a copy of the
//! frames (which rustls copies again to encrypt them in place), and a 16 KiB buffer per
//! connection from its first write on, beside h2's own 16 KiB write buffer. The gain is a
//! `writev`, a TLS record and a TCP segment per frame, on both sides of the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes gathered before they are written without waiting for the next turn, and
/// the size from which a single write goes straight through: a full TLS record.
pub const GATHER_LIMIT: usize = 16 * 1024;

/// An I/O stream whose writes are gathered and written once per turn of its task (see the
/// module docs). Reads pass through. Only for I/O that an HTTP/2 connection drives.
#[derive(Debug)]
pub struct Coalesce<I> {
    io: I,
    /// Bytes written by the caller and not yet handed to `io`, from `sent` on.
    gathered: Vec<u8>,
    sent: usize,
    /// A flush was put off: the task has been woken to write `gathered` in its next turn.
    flush_deferred: bool,
}

impl<I> Coalesce<I> {
    /// Wraps `io`.
    pub fn new(io: I) -> Self {
        Self {
            io,
            gathered: Vec::new(),
            sent: 0,
            flush_deferred: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    #[cfg(test)]
    fn get_mut_for_test(&mut self) -> &mut I {
        &mut self.io
    }

    fn waiting(&self) -> bool {
        self.sent < self.gathered.len()
    }
}

/// So that hyper-util's pooled client can hold a wrapped connection (the inbound's h2c
/// client to its app).
impl<I: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for Coalesce<I>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}

impl<I: AsyncWrite + Unpin> Coalesce<I> {
    /// Hands every gathered byte to `io`.
    fn poll_write_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.waiting() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.gathered[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.gathered.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes every gathered byte and flushes `io`. A flush put off stays put off until `io`
    /// has taken it all, so the next read tries again.
    fn poll_flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_gathered(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.flush_deferred = false;
        Poll::Ready(Ok(()))
    }

    /// Adds `bytes` to what is gathered. The buffer is allocated once, at its full size, so a
    /// connection holds at most [`GATHER_LIMIT`] bytes for it.
    fn gather(&mut self, bytes: &[u8]) {
        if self.gathered.capacity() == 0 {
            self.gathered.reserve_exact(GATHER_LIMIT);
        }
        self.gathered.extend_from_slice(bytes);
    }

    /// Makes room for `len` more bytes, writing what is gathered if they would not fit.
    fn poll_room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.gathered.len() + len > GATHER_LIMIT && self.waiting() {
            ready!(self.poll_write_gathered(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flush_deferred || this.waiting() {
            // A new turn, or bytes gathered before a read: they go out now. If the socket is
            // full, the task is woken when it drains, and reading goes on meanwhile.
            if let Poll::Ready(Err(e)) = this.poll_flush_now(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Coalesce<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room_for(cx, buf.len()))?;
        if buf.len() >= GATHER_LIMIT {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        this.gather(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        ready!(this.poll_room_for(cx, len))?;
        if len >= GATHER_LIMIT {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.gather(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.waiting() {
            return this.poll_flush_now(cx);
        }
        if !this.flush_deferred {
            this.flush_deferred = true;
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_now(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    /// A stream that records what reaches it.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut_down: bool,
        broken: bool,
        /// How many flushes to answer with `Pending` (a full socket) before taking one.
        flushes_blocked: usize,
        to_read: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.flushes_blocked > 0 {
                self.flushes_blocked -= 1;
                return Poll::Pending;
            }
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let data = std::mem::take(&mut self.to_read);
            buf.put_slice(&data);
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The result of a poll of a [`Recorder`], which never leaves one pending.
    fn ready<T>(polled: Poll<T>) -> T {
        match polled {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("the recorder never blocks"),
        }
    }

    /// Drives `c` by hand, as a task would, counting the wake-ups it asks for.
    struct Turns {
        c: Coalesce<Recorder>,
        wakes: Arc<CountingWaker>,
        waker: Waker,
    }

    impl Turns {
        fn new() -> Self {
            let wakes = Arc::new(CountingWaker::default());
            Self {
                c: Coalesce::new(Recorder::default()),
                waker: Waker::from(wakes.clone()),
                wakes,
            }
        }
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut cx = Context::from_waker(&self.waker);
            ready(Pin::new(&mut self.c).poll_write(&mut cx, bytes))
        }
        fn write_vectored(&mut self, parts: &[&[u8]]) -> io::Result<usize> {
            let slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
            let mut cx = Context::from_waker(&self.waker);
            ready(Pin::new(&mut self.c).poll_write_vectored(&mut cx, &slices))
        }
        fn flush(&mut self) -> io::Result<()> {
            let mut cx = Context::from_waker(&self.waker);
            ready(Pin::new(&mut self.c).poll_flush(&mut cx))
        }
        fn read(&mut self) -> io::Result<Vec<u8>> {
            let mut space = [0u8; 64];
            let mut buf = ReadBuf::new(&mut space);
            let mut cx = Context::from_waker(&self.waker);
            ready(Pin::new(&mut self.c).poll_read(&mut cx, &mut buf))
                .map(|()| buf.filled().to_vec())
        }
        fn shutdown(&mut self) -> io::Result<()> {
            let mut cx = Context::from_waker(&self.waker);
            ready(Pin::new(&mut self.c).poll_shutdown(&mut cx))
        }
        fn inner(&self) -> &Recorder {
            self.c.get_ref()
        }
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn the_frames_of_a_turn_go_out_in_one_write_at_the_next_turns_read() {
        let mut t = Turns::new();
        // h2's pattern: a frame, a flush before the next frame, and a flush at the end.
        assert_eq!(t.write(b"head-1").ok(), Some(6));
        t.flush().expect("put off");
        assert_eq!(t.write_vectored(&[b"data", b"-1"]).ok(), Some(6));
        t.flush().expect("put off");
        t.write(b"head-2").expect("gathered");
        t.flush().expect("put off");
        assert!(
            t.inner().writes.is_empty(),
            "nothing written within the turn"
        );
        assert_eq!(t.inner().flushes, 0);
        assert_eq!(t.wakes(), 1, "the task is woken once for its next turn");

        t.c.get_mut_for_test().to_read = b"peer".to_vec();
        assert_eq!(t.read().expect("read"), b"peer");
        assert_eq!(t.inner().writes, vec![b"head-1data-1head-2".to_vec()]);
        assert_eq!(t.inner().flushes, 1);

        // Reading on in the same turn writes nothing more.
        t.read().expect("read");
        assert_eq!(t.inner().writes.len(), 1);
        assert_eq!(t.inner().flushes, 1);
    }

    #[test]
    fn a_put_off_flush_the_stream_cannot_take_yet_is_tried_again_by_the_next_read() {
        let mut t = Turns::new();
        t.write(b"frame").expect("gathered");
        t.flush().expect("put off");
        t.c.get_mut_for_test().flushes_blocked = 1;
        t.read().expect("reading goes on while the socket is full");
        assert_eq!(t.inner().writes, vec![b"frame".to_vec()]);
        assert_eq!(t.inner().flushes, 0);
        t.read().expect("read");
        assert_eq!(t.inner().flushes, 1, "the next read flushes");
        t.read().expect("read");
        assert_eq!(t.inner().flushes, 1, "and only once");
    }

    #[test]
    fn the_buffer_never_grows_past_the_limit() {
        let mut t = Turns::new();
        for _ in 0..40 {
            t.write(&[3u8; 1033]).expect("gathered");
        }
        assert_eq!(t.c.gathered.capacity(), GATHER_LIMIT);
    }

    #[test]
    fn a_flush_with_nothing_gathered_flushes_the_stream_and_wakes_no_one() {
        let mut t = Turns::new();
        t.flush().expect("flush");
        assert_eq!(t.inner().flushes, 1);
        assert_eq!(t.wakes(), 0);
    }

    #[test]
    fn a_write_of_a_full_record_goes_straight_through_after_what_was_gathered() {
        let mut t = Turns::new();
        t.write(b"small").expect("gathered");
        let big = vec![7u8; GATHER_LIMIT];
        assert_eq!(t.write(&big).ok(), Some(GATHER_LIMIT));
        assert_eq!(t.inner().writes, vec![b"small".to_vec(), big]);
    }

    #[test]
    fn gathering_stops_at_the_limit() {
        let mut t = Turns::new();
        let most = vec![1u8; GATHER_LIMIT - 10];
        t.write(&most).expect("gathered");
        t.write(&[2u8; 20]).expect("gathered after a write");
        assert_eq!(t.inner().writes, vec![most]);
        t.flush().expect("put off");
        t.read().expect("read");
        assert_eq!(t.inner().writes.last(), Some(&vec![2u8; 20]));
    }

    #[test]
    fn shutting_down_writes_what_was_gathered_first() {
        let mut t = Turns::new();
        t.write(b"goaway").expect("gathered");
        t.flush().expect("put off");
        t.shutdown().expect("shut down");
        assert_eq!(t.inner().writes, vec![b"goaway".to_vec()]);
        assert!(t.inner().flushes >= 1);
        assert!(t.inner().shut_down);
    }

    #[test]
    fn a_put_off_write_that_fails_fails_the_next_read() {
        let mut t = Turns::new();
        t.write(b"frame").expect("gathered");
        t.flush().expect("put off");
        t.c.get_mut_for_test().broken = true;
        let e = t.read().expect_err("the write's error");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    /// Counts the writes that reach a stream.
    struct CountWrites<S> {
        inner: S,
        writes: Arc<AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for CountWrites<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for CountWrites<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if r.is_ready() {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The writes an HTTP/2 server makes to answer a burst of `burst` requests with 1 KiB
    /// bodies, with or without [`Coalesce`] under it; every answer is checked.
    async fn writes_for_a_burst(coalesce: bool, burst: usize) -> usize {
        use bytes::Bytes;
        use http_body_util::{BodyExt, Empty, Full};
        use hyper_util::rt::{TokioExecutor, TokioIo};

        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let counted = CountWrites {
            inner: server_io,
            writes: writes.clone(),
        };
        let answer = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                vec![b'x'; 1024],
            ))))
        });
        let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        if coalesce {
            let conn = server.serve_connection(TokioIo::new(Coalesce::new(counted)), answer);
            tokio::spawn(conn);
        } else {
            tokio::spawn(server.serve_connection(TokioIo::new(counted), answer));
        }
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let get = |mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>| async move {
            let request = hyper::Request::get("http://svc/").body(Empty::new());
            let response = sender
                .send_request(request.expect("request"))
                .await
                .expect("response");
            let body = response.into_body().collect().await.expect("body");
            assert_eq!(body.to_bytes().len(), 1024);
        };
        // The first request settles the connection (SETTINGS and their acks).
        get(sender.clone()).await;
        let before = writes.load(Ordering::Relaxed);
        futures::future::join_all((0..burst).map(|_| get(sender.clone()))).await;
        writes.load(Ordering::Relaxed) - before
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_http2_server_answers_a_burst_in_a_few_writes() {
        // Without gathering, h2 writes each response's DATA frame on its own.
        let plain = writes_for_a_burst(false, 16).await;
        assert!(
            plain >= 16,
            "h2 alone wrote a burst of 16 answers in {plain} writes"
        );
        let gathered = writes_for_a_burst(true, 16).await;
        assert!(
            gathered <= 4,
            "16 answers of 1 KiB took {gathered} writes (at most 2 of 16 KiB expected)"
        );
    }
}
