//! Graceful shutdown: stop accepting, let in-flight connections finish within the drain
//! window, then cut what is left.
//!
//! One [`Drain`] is shared (cloned) by every listener and connection. Listeners stop accepting
//! as soon as [`Drain::draining`] completes; connections run through [`Drain::spawn`], which
//! tracks them and aborts them when the window ends. The admin server reads
//! [`Drain::is_draining`] to answer `/ready` with 503.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use weft_proxy::drain::{Drain, shutdown_signal};
//! let drain = Drain::new();
//! // … start the data path with `drain.clone()` …
//! shutdown_signal().await?;
//! let outcome = drain.drain(std::time::Duration::from_secs(30)).await;
//! println!("{outcome:?}");
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// The drain signal and the set of in-flight connections.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    draining: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every in-flight connection finished within the window.
    Drained,
    /// The window ran out; this many connections were cut.
    TimedOut {
        /// Connections still open at the deadline.
        cut: usize,
    },
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Completes once draining starts.
    pub async fn draining(&self) {
        self.draining.cancelled().await;
    }

    /// Connections in flight.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Runs a connection's task, tracked for the drain and cut when the window ends.
    pub fn spawn<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(Cuttable {
            connection,
            abort: self.abort.clone().cancelled_owned(),
        });
    }

    /// Starts draining (listeners stop accepting), waits up to `window` for in-flight
    /// connections to finish, then cuts the rest.
    pub async fn drain(&self, window: Duration) -> DrainOutcome {
        self.draining.cancel();
        self.tracker.close();
        let outcome = match tokio::time::timeout(window, self.tracker.wait()).await {
            Ok(()) => DrainOutcome::Drained,
            Err(_) => DrainOutcome::TimedOut {
                cut: self.tracker.len(),
            },
        };
        self.abort.cancel();
        self.tracker.wait().await;
        outcome
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

pin_project_lite::pin_project! {
    /// A connection that ends when it is done or when the drain window runs out.
    ///
    /// A struct rather than an `async` block around `select!`: an async block keeps the moved
    /// connection future both as its capture and as the select's operand, doubling what
    /// every idle connection's task holds.
    struct Cuttable<F> {
        #[pin]
        connection: F,
        #[pin]
        abort: WaitForCancellationFutureOwned,
    }
}

impl<F: Future<Output = ()>> Future for Cuttable<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.abort.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.connection.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cuttable_connection_holds_its_future_once() {
        let payload = [0u8; 1024];
        let connection = async move {
            tokio::task::yield_now().await;
            std::hint::black_box(payload);
        };
        let size = std::mem::size_of_val(&connection);
        let cuttable = Cuttable {
            connection,
            abort: CancellationToken::new().cancelled_owned(),
        };
        assert!(std::mem::size_of_val(&cuttable) < size + 256);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_in_flight_then_cuts() {
        let drain = Drain::new();
        drain.spawn(tokio::time::sleep(Duration::from_secs(1)));
        assert_eq!(drain.in_flight(), 1);
        assert_eq!(
            drain.drain(Duration::from_secs(5)).await,
            DrainOutcome::Drained
        );
        assert!(drain.is_draining());

        let drain = Drain::new();
        drain.spawn(tokio::time::sleep(Duration::from_secs(60)));
        let start = tokio::time::Instant::now();
        assert_eq!(
            drain.drain(Duration::from_secs(2)).await,
            DrainOutcome::TimedOut { cut: 1 }
        );
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(drain.in_flight(), 0);
    }
}
