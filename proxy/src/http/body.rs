//! The body type of every request and response the proxy forwards or makes.
//!
//! An enum instead of a boxed trait object: forwarding a hyper [`Incoming`] body costs no
//! allocation, and the proxy's own small responses are a [`Bytes`]. A body can also hold
//! something until it ends (the endpoint's in-flight guard, the request's observation), so
//! that load and duration cover the whole exchange, streaming included.

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Called once with the bytes the body carried, and whether it ended cleanly.
pub type OnEnd = Box<dyn FnOnce(u64, bool) + Send>;

/// A forwarded or locally made body.
pub struct Body {
    kind: Kind,
    bytes: u64,
    hold: Option<crate::balance::InFlight>,
    on_end: Option<OnEnd>,
}

enum Kind {
    Incoming(Incoming),
    Full(Option<Bytes>),
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

    fn from_kind(kind: Kind) -> Self {
        Self {
            kind,
            bytes: 0,
            hold: None,
            on_end: None,
        }
    }

    /// Keeps `guard` (a request in flight to an endpoint) until the body ends.
    pub fn hold(mut self, guard: crate::balance::InFlight) -> Self {
        self.hold = Some(guard);
        self
    }

    /// Calls `f` once, when the body ends or is dropped unfinished.
    pub fn on_end(mut self, f: OnEnd) -> Self {
        self.on_end = Some(f);
        self
    }

    fn end(&mut self, clean: bool) {
        self.hold = None;
        if let Some(f) = self.on_end.take() {
            f(self.bytes, clean);
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let clean = match &self.kind {
            Kind::Incoming(b) => b.is_end_stream(),
            Kind::Full(b) => b.is_none(),
        };
        self.end(clean);
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Incoming(b) => Pin::new(b).poll_frame(cx),
            Kind::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Ready(None) => this.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Incoming(b) => b.is_end_stream(),
            Kind::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Incoming(b) => b.size_hint(),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
