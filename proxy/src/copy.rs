//! Forwarding bytes both ways between two streams, with half-close and bounded memory.
//!
//! Unlike `tokio::io::copy_bidirectional`, a direction holds no buffer while its source is
//! idle: it waits for readiness ([`ReadReady`]) first, takes a [`BUFFER_SIZE`] buffer only
//! when bytes are there, keeps it while data flows, and gives it back as soon as a read would
//! block. Ten thousand idle connections therefore cost no copy buffers at all, while a busy
//! connection moves data in large reads.
//!
//! When one side finishes sending (EOF, or a TLS `close_notify`), the other side's write half
//! is shut down (TCP FIN, or `close_notify` then FIN) and the opposite direction carries on
//! until it finishes too.

use crate::http::idle::Quiet;
use futures::task::AtomicWaker;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The copy buffer taken by a direction while data flows.
pub const BUFFER_SIZE: usize = 32 * 1024;

/// A stream that can wait until a read would make progress without being handed a buffer.
pub trait ReadReady {
    /// Ready when a read would return data, EOF or an error.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T: ReadReady + ?Sized> ReadReady for Box<T> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

impl ReadReady for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl ReadReady for tokio::io::DuplexStream {
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // In-memory pipes (tests) have no readiness of their own: read at once.
        Poll::Ready(Ok(()))
    }
}

/// A stream whose broken end can be passed on. Forwarding stops on the first error either
/// way (a reset, a stream error between the proxies); the other stream is then aborted rather
/// than closed, so that its peer sees the breakage and never takes the truncation for a clean
/// end of stream. (Envoy's TCP proxy does the same: it resets the downstream when the
/// upstream resets.)
pub trait Abort {
    /// Makes closing the stream abortive: a TCP socket sends RST, not FIN.
    fn abort(&mut self);
}

impl<T: Abort + ?Sized> Abort for Box<T> {
    fn abort(&mut self) {
        (**self).abort();
    }
}

impl Abort for TcpStream {
    fn abort(&mut self) {
        // With a zero linger time, closing the socket resets the connection at once; it does
        // not block (only a non-zero linger time does).
        let _ = self.set_zero_linger();
    }
}

impl Abort for tokio::io::DuplexStream {
    fn abort(&mut self) {}
}

/// Buffers kept per thread for reuse, so that bursts on many connections do not churn (and
/// fragment) the heap.
const POOL_PER_THREAD: usize = 32;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A [`BUFFER_SIZE`] buffer, from this thread's pool when it has one.
pub(crate) fn take_buffer() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice())
}

/// Returns a buffer to this thread's pool (or frees it: the pool is full, or the buffer was
/// resized).
pub(crate) fn give_back(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_PER_THREAD && buf.len() == BUFFER_SIZE {
            pool.push(buf);
        }
    });
}

/// One direction of the copy.
#[derive(Default)]
struct Direction {
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    bytes: u64,
    /// Bytes written so far.
    written: u64,
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.release();
    }
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ReadReady + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // Write out what was read.
            if self.pos < self.end {
                let Some(buf) = self.buf.as_deref() else {
                    return Poll::Ready(Err(io::Error::other("copy buffer lost")));
                };
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.written += n as u64;
                self.need_flush = true;
                continue;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx)).or_else(ignore_not_connected)?;
                self.done = true;
                self.release();
                continue;
            }
            // Wait for data without holding a buffer.
            if self.buf.is_none() {
                match r.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        self.buf = Some(take_buffer());
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return self.flush_then_pending(cx, w),
                }
            }
            let Some(buf) = self.buf.as_deref_mut() else {
                continue;
            };
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.read_done = true;
                    } else {
                        self.pos = 0;
                        self.end = n;
                        self.bytes += n as u64;
                    }
                }
                // A peer that closes TCP without TLS close_notify ends its stream all the same.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.read_done = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.release();
                    return self.flush_then_pending(cx, w);
                }
            }
        }
    }

    /// Bytes read plus bytes written: progress either way, for the idle check (a write the
    /// peer is slowly taking counts as activity).
    fn moved(&self) -> u64 {
        self.bytes + self.written
    }

    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(buf);
        }
    }

    fn flush_then_pending<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.need_flush {
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }
}

fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

/// Copies `a`→`b` and `b`→`a` until both directions have finished, and returns the bytes
/// moved each way (`a`→`b`, `b`→`a`). An error on either side ends both.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + ReadReady + Unpin,
    B: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    let copied = copy_until(a, b, std::future::pending(), None).await?;
    Ok((copied.a_to_b, copied.b_to_a))
}

/// How a [`copy_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions finished (each side sent its end of stream).
    Finished,
    /// `stop` resolved first.
    Stopped,
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// What [`copy_until`] moved, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Bytes moved from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes moved from `b` to `a`.
    pub b_to_a: u64,
    /// Why the copy ended.
    pub ended: Ended,
}

/// [`copy_bidirectional`], ended early when `stop` resolves, or when no byte has moved
/// either way for `idle_timeout` (Kuma's TCP idle timeout: a peer that vanished without a
/// FIN or RST must not hold two sockets and a task forever). What is in flight is dropped
/// with the streams.
pub async fn copy_until<A, B, S>(
    a: &mut A,
    b: &mut B,
    stop: S,
    idle_timeout: Option<Duration>,
) -> io::Result<Copied>
where
    A: AsyncRead + AsyncWrite + ReadReady + Unpin,
    B: AsyncRead + AsyncWrite + ReadReady + Unpin,
    S: Future<Output = ()>,
{
    let mut ab = Direction::default();
    let mut ba = Direction::default();
    let mut stop = std::pin::pin!(stop);
    // `stop` is polled only when its own waker fired (and once at first), not on every wake
    // of the copy: waiting futures such as a `watch` change take a lock each time they are
    // polled, and a busy copy wakes for every chunk.
    let gate = Arc::new(Gate {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let gate_waker = Waker::from(gate.clone());
    // The copy ends between 7/8 and 9/8 of the timeout after its last byte; its timer fires
    // a few times per timeout, not once per read. Capped so that the deadline arithmetic
    // cannot overflow.
    let period = idle_timeout.map(|t| Quiet::period(t).clamp(Duration::from_millis(1), DAY));
    // Boxed: an idle connection's future stays small, and the timer is needed only here.
    let mut check = period.map(|p| Box::pin(tokio::time::sleep(p)));
    let mut quiet = Quiet::from(0);
    poll_fn(|cx| {
        let copied = |ab: &Direction, ba: &Direction, ended| Copied {
            a_to_b: ab.bytes,
            b_to_a: ba.bytes,
            ended,
        };
        gate.task.register(cx.waker());
        if gate.woken.swap(false, Ordering::AcqRel)
            && stop
                .as_mut()
                .poll(&mut Context::from_waker(&gate_waker))
                .is_ready()
        {
            return Poll::Ready(Ok(copied(&ab, &ba, Ended::Stopped)));
        }
        let ab_state = ab.poll_copy(cx, a, b)?;
        let ba_state = ba.poll_copy(cx, b, a)?;
        if ab_state.is_ready() && ba_state.is_ready() {
            return Poll::Ready(Ok(copied(&ab, &ba, Ended::Finished)));
        }
        if let (Some(check), Some(period)) = (check.as_mut(), period) {
            while check.as_mut().poll(cx).is_ready() {
                if quiet.idle_at(ab.moved() + ba.moved()) {
                    return Poll::Ready(Ok(copied(&ab, &ba, Ended::Idle)));
                }
                check.as_mut().reset(tokio::time::Instant::now() + period);
            }
        }
        Poll::Pending
    })
    .await
}

/// Wakes the copy's task for its `stop` future, and notes that it did.
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// The longest idle check period.
const DAY: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        // client <-> (a | b) <-> server
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let fwd = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });

        let big = vec![7u8; 1 << 20];
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), big.len());
        // The other direction still works after the half-close.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let (up, down) = fwd.await.unwrap().unwrap();
        assert_eq!((up, down), (1 << 20, 5));
    }
}
