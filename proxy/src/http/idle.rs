//! The idle timeout of HTTP connections (Kuma's default: 1 h): a connection that moves no
//! byte in either direction for that long is closed gracefully.
//!
//! Each read or write bumps a counter (one relaxed atomic add, no clock read); a watcher
//! checks it every eighth of the timeout and reports the connection idle once it has not
//! moved for eight checks in a row, so the connection closes between 7/8 and 9/8 of the
//! timeout after its last byte.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many quiet checks make a connection idle.
const CHECKS: u32 = 8;

/// The idle rule on a progress counter read once per [`Quiet::period`]: idle once it has not
/// moved for [`CHECKS`] checks in a row. Shared by [`Activity`] and the opaque copy
/// ([`crate::copy::copy_until`]), which counts its own bytes.
#[derive(Debug)]
pub(crate) struct Quiet {
    seen: u64,
    quiet: u32,
}

impl Quiet {
    /// Starts from the counter's value now.
    pub(crate) fn from(count: u64) -> Self {
        Self {
            seen: count,
            quiet: 0,
        }
    }

    /// How often to check for an idle `timeout`.
    pub(crate) fn period(timeout: Duration) -> Duration {
        timeout / CHECKS
    }

    /// Records the counter at a check; true once it has stood still long enough.
    pub(crate) fn idle_at(&mut self, count: u64) -> bool {
        if count == self.seen {
            self.quiet += 1;
            self.quiet >= CHECKS
        } else {
            (self.seen, self.quiet) = (count, 0);
            false
        }
    }
}

/// The activity counter of one connection.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<AtomicU64>);

impl Activity {
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for about `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        let period = Quiet::period(timeout);
        let mut quiet = Quiet::from(self.0.load(Ordering::Relaxed));
        loop {
            tokio::time::sleep(period).await;
            if quiet.idle_at(self.0.load(Ordering::Relaxed)) {
                return;
            }
        }
    }
}

/// An I/O stream that counts its reads and writes into an [`Activity`].
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    activity: Activity,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`, counting into `activity`.
    pub fn new(inner: T, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if polled.is_ready() {
            this.activity.bump();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if polled.is_ready() {
            this.activity.bump();
        }
        polled
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if polled.is_ready() {
            this.activity.bump();
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_after_the_timeout_and_not_while_bytes_move() {
        let activity = Activity::default();
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = IdleIo::new(a, activity.clone());
        let timeout = Duration::from_secs(3600);
        let start = tokio::time::Instant::now();
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(timeout).await }
        });
        // Traffic every 10 minutes for 3 hours keeps the connection open.
        for _ in 0..18 {
            tokio::time::sleep(Duration::from_secs(600)).await;
            io.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            b.read_exact(&mut one).await.unwrap();
            assert!(!watcher.is_finished());
        }
        watcher.await.unwrap();
        let quiet = start.elapsed() - Duration::from_secs(3 * 3600);
        assert!(
            quiet >= timeout * 7 / 8 && quiet <= timeout * 9 / 8,
            "{quiet:?}"
        );
    }
}
