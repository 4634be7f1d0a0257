//! The body type of every request and response the proxy forwards or makes.
//!
//! An enum instead of a boxed trait object: forwarding a hyper [`Incoming`] body costs no
//! allocation, and the proxy's own small responses are a [`Bytes`]. A body can also hold
//! something until it ends (the endpoint's in-flight guard, the request's observation), so
//! that load and duration cover the whole exchange, streaming included, and the app
//! connection a response comes on, which goes back to its pool ([`crate::http::app_pool`])
//! when the response ends.

use crate::telemetry::RequestObservation;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

/// Counts the bytes of a request body, for the observation its response body finishes.
pub type ByteCount = Arc<AtomicU64>;

/// A forwarded or locally made body.
pub struct Body {
    kind: Kind,
    bytes: u64,
    hold: Option<crate::balance::InFlight>,
    /// The app connection this (response) body comes on, given back to its pool when the
    /// body ends cleanly.
    conn: Option<crate::http::app_pool::Lent>,
    /// This body's bytes go here as they pass (a request body, for its observation).
    count: Option<ByteCount>,
    /// Finished when this (response) body ends: with the request's bytes and this body's.
    observation: Option<(RequestObservation, Option<ByteCount>)>,
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
            conn: None,
            count: None,
            observation: None,
        }
    }

    /// Keeps `guard` (a request in flight to an endpoint) until the body ends.
    pub fn hold(mut self, guard: crate::balance::InFlight) -> Self {
        self.hold = Some(guard);
        self
    }

    /// Gives `conn` back to its pool when this body ends cleanly (and closes it otherwise).
    pub fn give_back_at_end(mut self, conn: crate::http::app_pool::Lent) -> Self {
        self.conn = Some(conn);
        self
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
        if let Some(conn) = self.conn.take()
            && clean
        {
            conn.give_back();
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
