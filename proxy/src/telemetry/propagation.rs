//! Trace-context headers: reading the caller's context from a request and writing ours into
//! the request the proxy forwards.
//!
//! - W3C Trace Context `traceparent` (`00-<trace-id>-<parent-id>-<flags>`), read and written
//!   for every tracing backend. `tracestate` is forwarded untouched when the trace continues
//!   and removed when the proxy has to start a new trace.
//! - B3, for zipkin backends: the single header `b3: <trace>-<span>[-<sampled>[-<parent>]]`
//!   and the multi headers `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags`,
//!   `x-b3-parentspanid`.
//!
//! Input comes from the application, so nothing here trusts it: a malformed or partial
//! header yields `None` (the proxy starts a new root span) and never a panic. With B3 on,
//! the single header wins over the multi headers, which win over `traceparent`. A B3 header
//! that carries only a sampling decision (`b3: 0`) has no ids to continue and is ignored.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceId};

use super::span::{span_hex, trace_hex};

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3 single header `b3`.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// `x-b3-traceid`.
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// `x-b3-spanid`.
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// `x-b3-parentspanid`.
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// `x-b3-sampled`.
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// `x-b3-flags` (`1` = debug, which implies sampled).
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// What the caller said about sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampled {
    /// Sample (W3C flag set; B3 `1`, `true` or debug).
    Yes,
    /// Do not sample.
    No,
    /// B3 without a decision: the receiver decides.
    Deferred,
}

/// A trace context read from a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The caller's trace.
    pub trace_id: TraceId,
    /// The caller's span: the parent of the span the proxy starts.
    pub span_id: SpanId,
    /// The caller's sampling decision.
    pub sampled: Sampled,
}

/// The span a forwarded request names as its parent: the proxy's own span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    /// The trace.
    pub trace_id: TraceId,
    /// The proxy's span.
    pub span_id: SpanId,
    /// Whether the trace is sampled.
    pub sampled: bool,
}

/// Reads the caller's trace context: `traceparent`, and with `b3` also the B3 headers (which
/// take precedence). `None` when nothing valid is present.
pub fn extract(headers: &HeaderMap, b3: bool) -> Option<Extracted> {
    // One pass over the few names, rather than lookups that miss when there is no B3 (as
    // between two weft proxies).
    if b3
        && headers.keys().any(is_b3)
        && let Some(e) = extract_b3(headers)
    {
        return Some(e);
    }
    extract_w3c(headers)
}

/// The one value of header `name`, as text; `None` when absent, repeated or not ASCII.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

/// The value of each byte as a lowercase hex digit, or [`NOT_HEX`]. W3C forbids uppercase.
static LOWER_HEX: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut b = 0;
    while b < 10 {
        table[b'0' as usize + b] = b as u8;
        b += 1;
    }
    let mut b = 0;
    while b < 6 {
        table[b'a' as usize + b] = 10 + b as u8;
        b += 1;
    }
    table
};

/// A byte that is no lowercase hex digit, in [`LOWER_HEX`].
const NOT_HEX: u8 = 0xff;

/// The `N` bytes written as `2 * N` lowercase hex digits in `hex`; `None` when `hex` has
/// another length or any other byte. Table-driven, on bytes rather than `&str`:
/// `traceparent` is read on every traced request, and the checks of `str` slicing and of a
/// digit at a time were most of that read's cost (`perf annotate` of `extract`).
fn lower_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (
            LOWER_HEX[usize::from(pair[0])],
            LOWER_HEX[usize::from(pair[1])],
        );
        // One test at the end instead of a branch per digit: `NOT_HEX` has the high bit.
        bad |= hi | lo;
        *byte = hi << 4 | (lo & 0xf);
    }
    (bad & 0x80 == 0).then_some(out)
}

/// Reads `traceparent` per W3C Trace Context level 1 (version 00; higher versions are read
/// by their first four fields, as the spec asks).
pub fn extract_w3c(headers: &HeaderMap) -> Option<Extracted> {
    let mut values = headers.get_all(&TRACEPARENT).iter();
    let value = values.next()?.as_bytes();
    if values.next().is_some() {
        return None;
    }
    // `vv-<32 hex>-<16 hex>-ff`, then (versions above 00 only) `-` and more.
    let [version] = lower_hex::<1>(value.get(0..2)?)?;
    if version == 0xff || value.len() < 55 || (version == 0 && value.len() != 55) {
        return None;
    }
    // A later version's extra fields are not read, but must be text like the rest.
    if value.len() > 55 && (value[55] != b'-' || !value[56..].is_ascii()) {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from_bytes(lower_hex::<16>(&value[3..35])?);
    let span_id = SpanId::from_bytes(lower_hex::<8>(&value[36..52])?);
    let [flags] = lower_hex::<1>(&value[53..55])?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(Extracted {
        trace_id,
        span_id,
        sampled: if flags & 1 == 1 {
            Sampled::Yes
        } else {
            Sampled::No
        },
    })
}

/// A B3 trace id: 16 or 32 hex digits (either case), not zero.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    if (s.len() != 16 && s.len() != 32) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = TraceId::from(u128::from_str_radix(s, 16).ok()?);
    (id != TraceId::INVALID).then_some(id)
}

/// A B3 span id: 16 hex digits (either case), not zero.
fn b3_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = SpanId::from(u64::from_str_radix(s, 16).ok()?);
    (id != SpanId::INVALID).then_some(id)
}

/// Reads B3: the single `b3` header, else the multi `x-b3-*` headers.
pub fn extract_b3(headers: &HeaderMap) -> Option<Extracted> {
    if let Some(v) = single(headers, &B3) {
        return extract_b3_single(v);
    }
    let trace_id = b3_trace_id(single(headers, &B3_TRACE_ID)?)?;
    let span_id = b3_span_id(single(headers, &B3_SPAN_ID)?)?;
    let debug = single(headers, &B3_FLAGS) == Some("1");
    let sampled = match single(headers, &B3_SAMPLED) {
        _ if debug => Sampled::Yes,
        Some("1") | Some("true") => Sampled::Yes,
        Some("0") | Some("false") => Sampled::No,
        None => Sampled::Deferred,
        Some(_) => return None,
    };
    Some(Extracted {
        trace_id,
        span_id,
        sampled,
    })
}

/// Reads `b3: {trace}-{span}[-{sampled}[-{parent}]]`.
fn extract_b3_single(value: &str) -> Option<Extracted> {
    let mut parts = value.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => Sampled::Deferred,
        Some("1") | Some("d") => Sampled::Yes,
        Some("0") => Sampled::No,
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Extracted {
        trace_id,
        span_id,
        sampled,
    })
}

/// What [`inject`] does with the B3 headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum B3Mode {
    /// Leaves them as the application sent them (no zipkin backend: B3 is not ours).
    Leave,
    /// Writes the single and multi headers (zipkin backend, request going to an app).
    Write,
    /// Removes them (zipkin backend, request going to the peer proxy). The peer reads
    /// `traceparent` and writes B3 for its own app; the application's stale B3 headers must
    /// not reach it, since B3 wins over `traceparent` when both are there. Between the
    /// proxies this saves five headers per request.
    Remove,
}

/// The B3 headers [`B3Mode::Remove`] removes.
const B3_HEADERS: [HeaderName; 6] = [
    B3,
    B3_TRACE_ID,
    B3_SPAN_ID,
    B3_SAMPLED,
    B3_FLAGS,
    B3_PARENT_SPAN_ID,
];

/// Rewrites the trace headers of a request the proxy forwards so that `span` is the parent
/// the next hop sees. `parent` is `span`'s own parent (written as `x-b3-parentspanid` and the
/// fourth `b3` field); `continued` says whether `span` continues the caller's trace (else
/// `tracestate` is dropped; when it continues, `tracestate` is forwarded untouched). `b3` says
/// whether the B3 single and multi headers are written, removed or left alone.
///
/// Runs for every traced request, so it allocates little: the values are written as hex into
/// one buffer, not through `format!`, and every header value is a slice of it.
pub fn inject(
    headers: &mut HeaderMap,
    span: SpanIds,
    parent: Option<SpanId>,
    continued: bool,
    b3: B3Mode,
) {
    let trace = trace_hex(span.trace_id);
    let id = span_hex(span.span_id);
    let flag = if span.sampled { b'1' } else { b'0' };
    let parent = parent.map(span_hex);
    let write_b3 = b3 == B3Mode::Write;
    // `00-{trace}-{id}-0{flag}`, then for B3 the single header `{trace}-{id}-{flag}[-{parent}]`,
    // whose pieces are also the multi headers' values.
    let mut buf = BytesMut::with_capacity(if write_b3 { 55 + 68 } else { 55 });
    buf.extend_from_slice(b"00-");
    buf.extend_from_slice(&trace);
    buf.extend_from_slice(b"-");
    buf.extend_from_slice(&id);
    buf.extend_from_slice(&[b'-', b'0', flag]);
    if write_b3 {
        buf.extend_from_slice(&trace);
        buf.extend_from_slice(b"-");
        buf.extend_from_slice(&id);
        buf.extend_from_slice(&[b'-', flag]);
        if let Some(p) = &parent {
            buf.extend_from_slice(b"-");
            buf.extend_from_slice(p);
        }
    }
    // Slicing makes the buffer shared, which costs an allocation of its own: only done when
    // there is more than one value in it.
    let buf = buf.freeze();
    let b3_single = write_b3.then(|| buf.slice(55..));
    let traceparent = if write_b3 { buf.slice(..55) } else { buf };
    if let Some(v) = shared(traceparent) {
        headers.insert(TRACEPARENT, v);
    }
    if !continued {
        headers.remove(TRACESTATE);
    }
    match b3 {
        B3Mode::Leave => return,
        B3Mode::Remove => {
            // Between the proxies there are none to remove, and one pass over the few
            // names is cheaper than six lookups that miss.
            if headers.keys().any(is_b3) {
                for name in B3_HEADERS {
                    headers.remove(name);
                }
            }
            return;
        }
        B3Mode::Write => {}
    }
    let Some(single) = b3_single else { return };
    // Only a caller's B3 can leave a flags or parent header behind.
    let had_b3 = headers.keys().any(is_b3);
    // Room for the five B3 headers at once: the map was sized for the headers that came in,
    // and growing it on the way costs a rehash each time.
    headers.reserve(5);
    if let Some(v) = shared(single.clone()) {
        headers.insert(B3, v);
    }
    if let Some(v) = shared(single.slice(0..32)) {
        headers.insert(B3_TRACE_ID, v);
    }
    if let Some(v) = shared(single.slice(33..49)) {
        headers.insert(B3_SPAN_ID, v);
    }
    let flag = if span.sampled { "1" } else { "0" };
    headers.insert(B3_SAMPLED, HeaderValue::from_static(flag));
    if had_b3 {
        headers.remove(B3_FLAGS);
    }
    match parent.and_then(|_| shared(single.slice(52..68))) {
        Some(v) => {
            headers.insert(B3_PARENT_SPAN_ID, v);
        }
        None if had_b3 => {
            headers.remove(B3_PARENT_SPAN_ID);
        }
        None => {}
    }
}

/// Whether `name` is one of the B3 headers.
fn is_b3(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "b3" || name.starts_with("x-b3-")
}

/// A header value over `bytes`, without copying them. These values are new with every
/// request, so they are marked sensitive: HTTP/2 then sends them as never-indexed literals,
/// since inserting a value nobody will repeat into the HPACK table would only cost the insert
/// and evict entries that do repeat.
fn shared(bytes: Bytes) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_maybe_shared(bytes).ok()?;
    v.set_sensitive(true);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("test header"));
        }
        h
    }

    #[test]
    fn reads_a_valid_traceparent() {
        let e = extract(&map(&[("traceparent", TP), ("tracestate", "k=v")]), false)
            .expect("valid traceparent");
        assert_eq!(e.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(e.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(e.sampled, Sampled::Yes);
        let unsampled = TP.replace("-01", "-00");
        let e = extract(&map(&[("traceparent", &unsampled)]), false).expect("valid");
        assert_eq!(e.sampled, Sampled::No);
        // A future version with more fields is read by its first four.
        let future = format!("cc{}-extra", &TP[2..]);
        assert!(extract(&map(&[("traceparent", &future)]), false).is_some());
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        let long = format!("{TP}-x");
        let bad = [
            "",
            "00",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473€-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            &long,
        ];
        for v in bad {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(TRACEPARENT, v);
            }
            assert_eq!(extract(&h, true), None, "{v:?}");
        }
        // Non-UTF-8 bytes and a repeated header are refused too.
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_bytes(b"00-\xff\xfe").expect("opaque bytes"),
        );
        assert_eq!(extract(&h, false), None);
        assert_eq!(
            extract(&map(&[("traceparent", TP), ("traceparent", TP)]), false),
            None
        );
    }

    #[test]
    fn reads_b3_single_and_multi_only_when_asked() {
        let single = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90";
        let h = map(&[("b3", single)]);
        assert_eq!(extract(&h, false), None, "B3 is read only for zipkin");
        let e = extract(&h, true).expect("valid b3");
        assert_eq!(e.trace_id.to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(e.span_id.to_string(), "e457b5a2e4d86bd1");
        assert_eq!(e.sampled, Sampled::Yes);

        // 64-bit trace ids are widened; no sampling field defers the decision.
        let e =
            extract(&map(&[("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312")]), true).expect("valid b3");
        assert_eq!(e.trace_id.to_string(), "0000000000000000463ac35c9f6413ad");
        assert_eq!(e.sampled, Sampled::Deferred);

        let multi = map(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]);
        let e = extract(&multi, true).expect("valid multi");
        assert_eq!(e.span_id.to_string(), "a2fb4a1d1a96d312");
        assert_eq!(e.sampled, Sampled::No);
        let mut debug = multi.clone();
        debug.insert(B3_FLAGS, HeaderValue::from_static("1"));
        assert_eq!(extract(&debug, true).map(|e| e.sampled), Some(Sampled::Yes));

        // B3 wins over traceparent; a broken B3 falls back to traceparent.
        let both = map(&[("b3", single), ("traceparent", TP)]);
        assert_eq!(
            extract(&both, true).map(|e| e.span_id.to_string()),
            Some("e457b5a2e4d86bd1".into())
        );
        let broken = map(&[("b3", "nonsense"), ("traceparent", TP)]);
        assert_eq!(
            extract(&broken, true).map(|e| e.span_id.to_string()),
            Some("00f067aa0ba902b7".into())
        );
    }

    #[test]
    fn malformed_b3_is_ignored() {
        let bad = [
            "0",
            "1",
            "d",
            "-",
            "80f198ee56343ba864fe8b2a57d3eff7",
            "80f198ee56343ba864fe8b2a57d3eff7-",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-2",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-zz",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-x",
            "80f198ee56343ba8-e457b5a2e4d86bd",
            "00000000000000000000000000000000-e457b5a2e4d86bd1",
            "+0f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1",
        ];
        for v in bad {
            assert_eq!(extract(&map(&[("b3", v)]), true), None, "{v:?}");
        }
        let missing_span = map(&[("x-b3-traceid", "463ac35c9f6413ad")]);
        assert_eq!(extract(&missing_span, true), None);
        let bad_sampled = map(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "yes"),
        ]);
        assert_eq!(extract(&bad_sampled, true), None);
    }

    #[test]
    fn injects_what_it_extracts() {
        let sc = SpanIds {
            trace_id: TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736),
            span_id: SpanId::from(0x1122334455667788),
            sampled: true,
        };
        let parent = SpanId::from(0x00f067aa0ba902b7);
        let mut h = map(&[("tracestate", "k=v"), ("x-b3-flags", "1")]);
        inject(&mut h, sc, Some(parent), true, B3Mode::Write);
        assert_eq!(
            h.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-01")
        );
        assert_eq!(
            h.get(B3).and_then(|v| v.to_str().ok()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-1-00f067aa0ba902b7")
        );
        assert!(h.get(TRACESTATE).is_some(), "kept when the trace continues");
        assert!(h.get(B3_FLAGS).is_none());
        assert_eq!(
            h.get(B3_PARENT_SPAN_ID).and_then(|v| v.to_str().ok()),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(
            h.get(B3_TRACE_ID).and_then(|v| v.to_str().ok()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            h.get(B3_SPAN_ID).and_then(|v| v.to_str().ok()),
            Some("1122334455667788")
        );
        assert_eq!(h.get(B3_SAMPLED).and_then(|v| v.to_str().ok()), Some("1"));
        let mut multi = h.clone();
        multi.remove(B3);
        assert_eq!(
            extract_b3(&multi).map(|e| (e.trace_id, e.span_id)),
            Some((sc.trace_id, sc.span_id)),
            "the multi headers alone carry the span"
        );
        for b3 in [false, true] {
            let e = extract(&h, b3).expect("round trip");
            assert_eq!(e.trace_id, sc.trace_id);
            assert_eq!(e.span_id, sc.span_id);
            assert_eq!(e.sampled, Sampled::Yes);
        }

        let unsampled = SpanIds {
            sampled: false,
            ..sc
        };
        let mut h = map(&[("tracestate", "k=v"), ("b3", "stale")]);
        inject(&mut h, unsampled, None, false, B3Mode::Leave);
        assert!(
            h.get(TRACEPARENT)
                .is_some_and(|v| v.as_bytes().ends_with(b"-00"))
        );
        assert!(h.get(TRACESTATE).is_none(), "dropped on a new trace");
        assert_eq!(h.get(B3).map(|v| v.as_bytes()), Some(&b"stale"[..]));

        // Towards the peer proxy: only `traceparent`; the app's B3 headers are gone.
        let mut h = map(&[
            ("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312-1"),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
            ("x-b3-flags", "1"),
            ("x-b3-parentspanid", "00f067aa0ba902b7"),
        ]);
        inject(&mut h, sc, Some(parent), true, B3Mode::Remove);
        assert_eq!(h.len(), 1, "{h:?}");
        let e = extract(&h, true).expect("the peer reads traceparent");
        assert_eq!((e.trace_id, e.span_id), (sc.trace_id, sc.span_id));
    }
}
