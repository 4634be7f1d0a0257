//! The body type of every request and response the proxy forwards or makes.
//!
//! An enum instead of a boxed trait object: forwarding a hyper [`Incoming`] body or an HTTP/2
//! [`RecvStream`] (a response from the mesh, see [`crate::http::mesh_stream`]) costs no
//! allocation, and the proxy's own small responses are a [`Bytes`]. A body can also hold
//! something until it ends (the endpoint's in-flight guard, the request's observation), so
//! that load and duration cover the whole exchange, streaming included. A response from the
//! app's HTTP/1.1 connection is an [`AppBody`], which puts its connection back into the pool
//! ([`crate::http::app_pool`]) itself when the response ends.

use crate::http::app_http1::{AppBody, AppBodyError};
use crate::http::mesh_stream::StreamGuard;
use crate::telemetry::RequestObservation;
use bytes::Bytes;
use h2::RecvStream;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

/// Counts the bytes of a request body, for the observation its response body finishes.
pub type ByteCount = Arc<AtomicU64>;

/// The longest between two looks at an idle body (a day), so that the deadline arithmetic
/// cannot overflow with a huge configured timeout.
const IDLE_PERIOD_CAP: std::time::Duration = std::time::Duration::from_secs(86_400);

/// A forwarded or locally made body.
pub struct Body {
    kind: Kind,
    bytes: u64,
    hold: Option<crate::balance::InFlight>,
    /// This body's bytes go here as they pass (a request body, for its observation).
    count: Option<ByteCount>,
    /// How long the body may bring no frame (a response from the mesh); its timer is made
    /// only once the body has to wait.
    idle_timeout: Option<std::time::Duration>,
    idle: Option<Box<IdleWatch>>,
    /// Finished when this (response) body ends: with the request's bytes and this body's.
    observation: Option<(RequestObservation, Option<ByteCount>)>,
    /// Told when this (request) body has ended; dropped with it otherwise, which tells too.
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

enum Kind {
    Incoming(Incoming),
    /// A stream's DATA, then its trailers (`data_done` once the DATA has ended); the guard
    /// counts the stream as open on its connection.
    Stream {
        stream: RecvStream,
        data_done: bool,
        _open: Option<StreamGuard>,
    },
    App(AppBody),
    Full(Option<Bytes>),
}

/// Why a forwarded body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// A body hyper received.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// A body received on a mesh stream.
    #[error(transparent)]
    Stream(#[from] h2::Error),
    /// A response body from the app's HTTP/1.1 connection.
    #[error(transparent)]
    App(#[from] AppBodyError),
    /// No frame came for the stream idle timeout.
    #[error("no data for {0:?} (stream idle timeout)")]
    Idle(std::time::Duration),
}

/// The stream idle timeout of a body that has had to wait: a timer that looks every eighth
/// of the timeout whether a frame came meanwhile, or a chunk of the request went out on the
/// same stream (they count, they do not reset a timer).
struct IdleWatch {
    timer: Pin<Box<tokio::time::Sleep>>,
    quiet: crate::http::idle::Quiet,
    frames: u64,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Body {
    /// A body with nothing in it.
    pub fn empty() -> Self {
        Self::from_kind(Kind::Full(None))
    }

    /// A body made of `text`.
    pub fn text(text: &'static str) -> Self {
        Self::from_kind(Kind::Full(Some(Bytes::from_static(text.as_bytes()))))
    }

    /// Forwards a body received by hyper.
    pub fn incoming(body: Incoming) -> Self {
        Self::from_kind(Kind::Incoming(body))
    }

    /// Forwards the body of an HTTP/2 stream (flow-control credit goes back as it is read),
    /// holding `open` (the stream's count on its connection) until the body is dropped.
    pub fn stream(stream: RecvStream, open: Option<StreamGuard>) -> Self {
        Self::from_kind(Kind::Stream {
            stream,
            data_done: false,
            _open: open,
        })
    }

    fn from_kind(kind: Kind) -> Self {
        Self {
            kind,
            bytes: 0,
            hold: None,
            count: None,
            idle_timeout: None,
            idle: None,
            observation: None,
            ended: None,
        }
    }

    /// Tells `ended` when this body has ended (or was dropped before its end): a request
    /// timeout that runs from the end of the request waits for it.
    pub fn on_end(mut self, ended: tokio::sync::oneshot::Sender<()>) -> Self {
        self.ended = Some(ended);
        self
    }

    /// Ends the body with [`BodyError::Idle`] when it brings no frame for `timeout`.
    pub fn idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Whether the body, waiting now, has brought no frame for its idle timeout.
    fn idle(&mut self, cx: &mut Context<'_>) -> Option<std::time::Duration> {
        let timeout = self.idle_timeout?;
        // Request body still going out on the same stream is activity too (a bidirectional
        // stream whose server answers rarely), as in Envoy's stream idle timeout.
        let sent = match &self.kind {
            Kind::Stream { _open: Some(g), .. } => g.request_chunks(),
            _ => 0,
        };
        let period = crate::http::idle::Quiet::period(timeout)
            .clamp(std::time::Duration::from_millis(1), IDLE_PERIOD_CAP);
        let watch = self.idle.get_or_insert_with(|| {
            Box::new(IdleWatch {
                timer: Box::pin(tokio::time::sleep(period)),
                quiet: crate::http::idle::Quiet::from(0),
                frames: 0,
            })
        });
        while watch.timer.as_mut().poll(cx).is_ready() {
            if watch.quiet.idle_at(watch.frames + sent) {
                return Some(timeout);
            }
            let next = tokio::time::Instant::now() + period;
            watch.timer.as_mut().reset(next);
        }
        None
    }

    /// Keeps `guard` (a request in flight to an endpoint) until the body ends.
    pub fn hold(mut self, guard: crate::balance::InFlight) -> Self {
        self.hold = Some(guard);
        self
    }

    /// Forwards a response body from the app's HTTP/1.1 connection (whose connection goes
    /// back to its pool when the body has ended).
    pub fn app(body: AppBody) -> Self {
        Self::from_kind(Kind::App(body))
    }

    /// Adds this body's bytes to `count` as they pass.
    pub fn count_into(mut self, count: ByteCount) -> Self {
        self.count = Some(count);
        self
    }

    /// Finishes `observation` when this body ends (or is dropped unfinished), with the bytes
    /// of the request (`request_bytes`, when counted) and of this body.
    pub fn finish(
        mut self,
        observation: RequestObservation,
        request_bytes: Option<ByteCount>,
    ) -> Self {
        self.observation = Some((observation, request_bytes));
        self
    }

    fn end(&mut self, clean: bool) {
        self.hold = None;
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
        if let Some(c) = &self.count {
            c.fetch_add(self.bytes, Ordering::Relaxed);
            self.bytes = 0;
            self.count = None;
        }
        if let Some((obs, request)) = self.observation.take() {
            let sent = request.map_or(0, |c| c.load(Ordering::Relaxed));
            let error = (!clean).then_some("response aborted");
            obs.finish(sent, self.bytes, error);
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // A body that ended (or never had anything to record) has nothing left to do; asking
        // an HTTP/2 stream whether it ended takes its connection's lock.
        if self.hold.is_none() && self.count.is_none() && self.observation.is_none() {
            return;
        }
        let clean = self.is_end_stream();
        self.end(clean);
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Incoming(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
            Kind::Stream {
                stream, data_done, ..
            } => poll_stream(stream, data_done, cx),
            Kind::App(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
            Kind::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if let Some(w) = &mut this.idle {
                    w.frames += 1;
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Ready(None) => this.end(true),
            Poll::Pending => {
                if let Some(timeout) = this.idle(cx) {
                    this.end(false);
                    this.idle = None;
                    this.idle_timeout = None;
                    return Poll::Ready(Some(Err(BodyError::Idle(timeout))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Incoming(b) => b.is_end_stream(),
            Kind::Stream { stream, .. } => stream.is_end_stream(),
            Kind::App(b) => b.is_end_stream(),
            Kind::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Incoming(b) => b.size_hint(),
            Kind::Stream { stream, .. } if stream.is_end_stream() => SizeHint::with_exact(0),
            Kind::Stream { .. } => SizeHint::default(),
            Kind::App(b) => b.size_hint(),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// The next frame of a stream's body: DATA until it ends, then the trailers if any.
fn poll_stream(
    stream: &mut RecvStream,
    data_done: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    if !*data_done {
        match std::task::ready!(stream.poll_data(cx)) {
            Some(Ok(data)) => {
                // The credit goes back as the data moves on: the peer may send one window
                // ahead of what the next hop has taken.
                let _ = stream.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => *data_done = true,
        }
    }
    match std::task::ready!(stream.poll_trailers(cx)) {
        Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
        Ok(None) => Poll::Ready(None),
        Err(e) => Poll::Ready(Some(Err(e.into()))),
    }
}
