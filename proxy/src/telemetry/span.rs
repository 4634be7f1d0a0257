//! weft's own span record: what one HTTP exchange contributes to a trace, kept as plain
//! fields until the exporter task turns a batch of them into OTLP or Zipkin.
//!
//! Why not the OpenTelemetry SDK's spans: a span is made for every request on the data path,
//! and the SDK builds each as a vector of owned key-values, with a shared resource, events and
//! links, through a span processor chain. Measured with `weft-bench mesh --weft-telemetry
//! tracing`, that cost a third of the proxy's throughput. A [`SpanRecord`] instead holds ids,
//! times, the method, copies of the path and authority, and the service names' `Arc`s; the
//! attributes are written once per batch, in the exporter task, off the request path. The
//! wire formats stay the standard ones: OTLP's protobuf (written directly, and checked against
//! `opentelemetry-proto`'s types: see [`super::otlp`]) and Zipkin v2 JSON. (linkerd2-proxy
//! does the same: its spans are its own type, converted to OTLP for export.)
//!
//! The path and authority are copied into the record, inline when short ([`InlineStr`] says
//! why).

use std::cell::RefCell;
use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use opentelemetry::trace::{SpanId, TraceId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::Direction;

/// Client (outbound proxy) or server (inbound proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The outbound proxy's span: it calls the destination service.
    Client,
    /// The inbound proxy's span: it serves the caller.
    Server,
}

impl SpanKind {
    /// The kind of the spans made on `direction`.
    pub fn of(direction: Direction) -> Self {
        match direction {
            Direction::Outbound => SpanKind::Client,
            Direction::Inbound => SpanKind::Server,
        }
    }
}

/// Text a span copies out of its request (the path, the authority): inline up to
/// [`InlineStr::INLINE`] bytes, which holds almost every path and authority, and on the heap
/// beyond that.
///
/// Copied rather than shared: hyper hands the path and the `Host` header out as slices of the
/// connection's read buffer, and a queued span holding one would keep that whole buffer alive
/// until its batch is exported. Inline rather than boxed: two allocations per span were a
/// measurable part of tracing's cost (`weft-bench mesh --weft-telemetry tracing`).
#[derive(Clone, PartialEq, Eq)]
pub struct InlineStr(InlineRepr);

#[derive(Clone, PartialEq, Eq)]
enum InlineRepr {
    Inline {
        len: u8,
        bytes: [u8; InlineStr::INLINE],
    },
    Heap(Box<str>),
}

impl InlineStr {
    /// The longest text held without an allocation.
    pub const INLINE: usize = 46;

    /// A copy of `text`.
    pub fn new(text: &str) -> Self {
        match u8::try_from(text.len()) {
            Ok(len) if text.len() <= Self::INLINE => {
                let mut bytes = [0; Self::INLINE];
                bytes[..text.len()].copy_from_slice(text.as_bytes());
                Self(InlineRepr::Inline { len, bytes })
            }
            _ => Self(InlineRepr::Heap(text.into())),
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Always valid: the bytes were copied whole from a `&str`.
            InlineRepr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            InlineRepr::Heap(text) => text,
        }
    }
}

impl fmt::Debug for InlineStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The bytes an authority may hold (RFC 3986), as a table: the outbound proxy checks the
/// `Host` header of every traced HTTP/1.1 request.
static AUTHORITY_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~!$&'()*+,;=:@[]%";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

/// `server.address`/`server.port` as the request named them: its authority, or its `Host`
/// header, copied as text (an [`InlineStr`]) and split into host and port when exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName(InlineStr);

impl ServerName {
    /// A request URI's authority.
    pub fn from_authority(authority: &Authority) -> Self {
        Self(InlineStr::new(authority.as_str()))
    }

    /// A `Host` header's value; `None` when it is empty or holds a byte no authority may
    /// hold (RFC 3986: letters, digits and `-._~!$&'()*+,;=:@[]%`).
    pub fn new(authority: &[u8]) -> Option<Self> {
        if authority.is_empty() || !authority.iter().all(|&b| AUTHORITY_BYTES[usize::from(b)]) {
            return None;
        }
        let text = std::str::from_utf8(authority).ok()?;
        Some(Self(InlineStr::new(text)))
    }

    /// Host and port (`None` when absent or not a number). The host keeps an IPv6
    /// literal's brackets and drops any `userinfo@`, as [`Authority::host`] does.
    pub fn host_port(&self) -> (&str, Option<u16>) {
        let text = self.0.as_str();
        let host_port = text.rsplit_once('@').map_or(text, |(_, rest)| rest);
        match host_port.rsplit_once(':') {
            // A ':' inside the brackets belongs to an IPv6 literal, not to a port.
            Some((host, port)) if !port.contains(']') => (host, port.parse().ok()),
            _ => (host_port, None),
        }
    }
}

/// How an exchange failed, for `error.type` and the span status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanError {
    /// An error status code (5xx on both sides, 4xx on the client side).
    Status(u16),
    /// The connection failed (`transport`) or the exchange was cut short (`aborted`), with
    /// what happened.
    Transport {
        /// `transport` or `aborted`.
        kind: &'static str,
        /// What happened.
        message: String,
    },
    /// No response came back.
    NoResponse,
}

impl SpanError {
    /// The `error.type` attribute.
    pub fn error_type(&self) -> String {
        match self {
            SpanError::Status(code) => code.to_string(),
            SpanError::Transport { kind, .. } => (*kind).to_string(),
            SpanError::NoResponse => "transport".to_string(),
        }
    }

    /// The span status message (empty for an error status code).
    pub fn message(&self) -> &str {
        match self {
            SpanError::Status(_) => "",
            SpanError::Transport { message, .. } => message,
            SpanError::NoResponse => "no response",
        }
    }
}

/// One finished (or being recorded) span of a sampled exchange.
#[derive(Clone)]
pub struct SpanRecord {
    /// The trace.
    pub trace_id: TraceId,
    /// This span.
    pub span_id: SpanId,
    /// The caller's span, when the trace continues one.
    pub parent_id: Option<SpanId>,
    /// Client or server.
    pub kind: SpanKind,
    /// The span name and `http.request.method`: a standard method or `_OTHER`.
    pub method: &'static str,
    /// `http.request.method_original`, for `_OTHER` only.
    pub method_original: Option<Box<str>>,
    /// `url.path`, without the query.
    pub path: InlineStr,
    /// `url.scheme` is `https` (else `http`).
    pub https: bool,
    /// `server.address`/`server.port`.
    pub server: Option<ServerName>,
    /// `weft.service`: the destination service (outbound) or the local one (inbound).
    pub service: Arc<str>,
    /// `peer.service`: the caller's service on the inbound side, when known.
    pub peer_service: Option<Arc<str>>,
    /// When the exchange started.
    pub start: SystemTime,
    /// How long it took (set when it ends).
    pub duration: Duration,
    /// `http.response.status_code`.
    pub status: Option<u16>,
    /// `network.peer.address`/`network.peer.port`.
    pub peer: Option<SocketAddr>,
    /// The failure, if any.
    pub error: Option<SpanError>,
}

impl fmt::Debug for SpanRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanRecord")
            .field("trace_id", &self.trace_id)
            .field("span_id", &self.span_id)
            .field("kind", &self.kind)
            .field("method", &self.method)
            .field("service", &self.service)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// The most exported span records a thread keeps for reuse: one default export batch.
const MAX_SPARE_RECORDS: usize = 512;

thread_local! {
    /// Boxes of exported span records, for the next spans made on this thread.
    #[expect(clippy::vec_box, reason = "the boxes are what is kept for reuse")]
    static SPARE_RECORDS: RefCell<Vec<Box<SpanRecord>>> = const { RefCell::new(Vec::new()) };
    /// The service name a kept record holds in place of its own.
    static NO_SERVICE: Arc<str> = Arc::from("");
}

impl SpanRecord {
    /// `record` in a box: one the exporter gave back on this thread ([`SpanRecord::recycle`])
    /// when there is one, else a new one.
    ///
    /// Why: the exporter frees a whole batch at once, far more than glibc's per-thread cache
    /// holds, so each new record was carved again from the heap's bins (`_int_malloc` and
    /// `_int_free` were a tenth of tracing's cost per request in `perf record`).
    pub fn boxed(record: SpanRecord) -> Box<SpanRecord> {
        match SPARE_RECORDS.with(|spare| spare.borrow_mut().pop()) {
            Some(mut reused) => {
                *reused = record;
                reused
            }
            None => Box::new(record),
        }
    }

    /// Keeps the boxes of `records` (exported, no longer needed) for [`SpanRecord::boxed`] on
    /// this thread, up to one batch's worth; frees the rest. A kept record lets go of what it
    /// refers to (service names, text on the heap) now, while it is still in cache, rather
    /// than when its box is reused.
    pub fn recycle(records: impl Iterator<Item = Box<SpanRecord>>) {
        let no_service = NO_SERVICE.with(Arc::clone);
        SPARE_RECORDS.with(|spare| {
            let mut spare = spare.borrow_mut();
            let room = MAX_SPARE_RECORDS.saturating_sub(spare.len());
            let mut records = records;
            spare.extend(records.by_ref().take(room).map(|mut r| {
                r.release(&no_service);
                r
            }));
            drop(spare);
            records.for_each(drop);
        });
    }

    /// Drops what the record refers to, leaving values that own nothing.
    fn release(&mut self, no_service: &Arc<str>) {
        self.method_original = None;
        self.path = InlineStr::new("");
        self.server = None;
        self.service = Arc::clone(no_service);
        self.peer_service = None;
        self.error = None;
    }

    /// Brings every record of `batch` into this core's cache at once, before any is encoded.
    ///
    /// A record is written on the request path and has left the cache by the time its batch
    /// is exported (a batch gathers over milliseconds of other work): encoded one after
    /// another, each record waited for its own cache misses in turn, and those waits were most of what encoding a batch cost
    /// (`perf annotate` of the exporter). Loads from different records do not depend on one
    /// another, so a pass that only reads a field on each of a record's cache lines lets the
    /// misses of many records overlap.
    pub fn warm_up(batch: &[Box<SpanRecord>]) {
        let mut sum = 0u64;
        for s in batch {
            sum = sum
                .wrapping_add(s.span_id.to_bytes()[0].into())
                .wrapping_add(s.parent_id.is_some().into())
                .wrapping_add(s.method.len() as u64)
                .wrapping_add(s.method_original.is_some().into())
                .wrapping_add(s.path.as_str().len() as u64)
                .wrapping_add(s.https.into())
                .wrapping_add(s.server.is_some().into())
                .wrapping_add(Arc::as_ptr(&s.service).cast::<u8>() as u64)
                .wrapping_add(s.peer_service.is_some().into())
                .wrapping_add(s.duration.subsec_nanos().into())
                .wrapping_add(s.status.unwrap_or(0).into())
                .wrapping_add(s.peer.map_or(0, |p| p.port()).into())
                .wrapping_add(s.error.is_some().into());
        }
        std::hint::black_box(sum);
    }

    /// `weft.direction`.
    pub fn direction(&self) -> &'static str {
        match self.kind {
            SpanKind::Client => Direction::Outbound.as_str(),
            SpanKind::Server => Direction::Inbound.as_str(),
        }
    }

    /// The path without its query.
    pub fn url_path(&self) -> &str {
        match self.path.as_str() {
            "" => "/",
            path => path,
        }
    }

    /// Start time in nanoseconds since the Unix epoch.
    pub fn start_unix_nanos(&self) -> u64 {
        unix_nanos(self.start)
    }

    /// End time in nanoseconds since the Unix epoch.
    pub fn end_unix_nanos(&self) -> u64 {
        unix_nanos(self.start + self.duration)
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Lowercase hex of `bytes` into `out` (which must be twice as long).
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// An IP address as text in a stack buffer, for the exporters: IPv4 without the `fmt`
/// machinery (which costs more than the digits) and without a `String`; IPv6, rare in a mesh,
/// through `fmt`.
pub struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    /// `ip` in its usual text form (dotted decimal, or RFC 5952 for IPv6).
    pub fn new(ip: IpAddr) -> Self {
        let mut t = Self {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b".");
                    }
                    t.push(itoa::Buffer::new().format(octet).as_bytes());
                }
            }
            IpAddr::V6(v6) => {
                // 45 bytes hold the longest form (an IPv4-mapped address in full).
                let mut cursor = std::io::Cursor::new(&mut t.buf[..]);
                if write!(cursor, "{v6}").is_ok() {
                    t.len = usize::try_from(cursor.position()).unwrap_or(0);
                }
            }
        }
        t
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// A trace id as 32 lowercase hex digits, without going through `fmt`.
pub fn trace_hex(id: TraceId) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex_into(&id.to_bytes(), &mut out);
    out
}

/// A span id as 16 lowercase hex digits.
pub fn span_hex(id: SpanId) -> [u8; 16] {
    let mut out = [0u8; 16];
    hex_into(&id.to_bytes(), &mut out);
    out
}

/// The sampler of one tracing backend: a function of the trace id only, so every weft proxy
/// with the same percentage decides the same for one trace.
///
/// The same rule as OpenTelemetry's `TraceIdRatioBased`: the trace id's low 63 bits against
/// the ratio's share of 2^63.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    upper_bound: u64,
    always: bool,
}

impl Sampler {
    /// A sampler of `percent` % (clamped to 0..=100; not a number samples nothing).
    pub fn percent(percent: f64) -> Self {
        let ratio = if percent.is_finite() {
            (percent / 100.0).clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self {
            // In range: ratio is in [0, 1]; the cast saturates at the top.
            upper_bound: (ratio * (1u64 << 63) as f64) as u64,
            always: ratio >= 1.0,
        }
    }

    /// Whether the trace is sampled.
    pub fn sampled(&self, trace_id: TraceId) -> bool {
        if self.always {
            return true;
        }
        let bytes = trace_id.to_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..]);
        (u64::from_be_bytes(low) >> 1) < self.upper_bound
    }
}

thread_local! {
    /// The ids' generator: a small fast generator per thread, seeded from the thread's
    /// cryptographic generator. Ids must be unique, not secret; the OpenTelemetry SDK's
    /// `RandomIdGenerator` makes the same choice. It runs twice or three times per traced
    /// request.
    static ID_RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// A new random trace id (never the invalid all-zero id).
pub fn new_trace_id() -> TraceId {
    ID_RNG.with_borrow_mut(|rng| {
        loop {
            let id: u128 = rng.random();
            if id != 0 {
                return TraceId::from(id);
            }
        }
    })
}

/// A new random span id (never the invalid all-zero id).
pub fn new_span_id() -> SpanId {
    ID_RNG.with_borrow_mut(|rng| {
        loop {
            let id: u64 = rng.random();
            if id != 0 {
                return SpanId::from(id);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> SpanRecord {
        SpanRecord {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_id: None,
            kind: SpanKind::Server,
            method: "GET",
            method_original: None,
            path: InlineStr::new(path),
            https: false,
            server: None,
            service: Arc::from("backend"),
            peer_service: None,
            start: SystemTime::now(),
            duration: Duration::ZERO,
            status: None,
            peer: None,
            error: None,
        }
    }

    #[test]
    fn exported_records_are_reused_up_to_one_batch() {
        // Another test on this thread may have left records (with one test thread, tests
        // share it).
        SPARE_RECORDS.with(|s| s.borrow_mut().clear());
        let spare = || SPARE_RECORDS.with(|s| s.borrow().len());
        let mut first = Box::new(record(&"/old".repeat(100)));
        let service = Arc::clone(&first.service);
        first.error = Some(SpanError::NoResponse);
        let first_at: *const SpanRecord = &*first;
        SpanRecord::recycle(std::iter::once(first));
        assert_eq!(spare(), 1);
        assert_eq!(
            Arc::strong_count(&service),
            1,
            "a kept record lets go of its service"
        );
        SPARE_RECORDS.with(|s| {
            let s = s.borrow();
            assert!(s[0].path.as_str().is_empty() && s[0].error.is_none());
        });
        let reused = SpanRecord::boxed(record("/new"));
        assert!(
            std::ptr::eq(&*reused, first_at),
            "the box is the one given back"
        );
        assert_eq!(reused.path.as_str(), "/new", "with the new contents");
        assert_eq!(spare(), 0);
        SpanRecord::recycle((0..MAX_SPARE_RECORDS + 100).map(|_| Box::new(record("/"))));
        assert_eq!(spare(), MAX_SPARE_RECORDS, "the rest are freed");
        let fresh = SpanRecord::boxed(record("/"));
        assert_eq!(fresh.path.as_str(), "/");
    }

    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "255.255.255.255",
            "::1",
            "fd00::1:2",
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().expect("address");
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
    }

    #[test]
    fn hex_matches_display() {
        let t = TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128);
        assert_eq!(&trace_hex(t), t.to_string().as_bytes());
        let s = SpanId::from(0x00f067aa0ba902b7u64);
        assert_eq!(&span_hex(s), s.to_string().as_bytes());
    }

    #[test]
    fn sampling_follows_the_percentage_and_the_trace_id() {
        let (none, all, half) = (
            Sampler::percent(0.0),
            Sampler::percent(100.0),
            Sampler::percent(50.0),
        );
        let mut sampled = 0;
        for _ in 0..10_000 {
            let id = new_trace_id();
            assert!(!none.sampled(id));
            assert!(all.sampled(id));
            // The same id always gets the same answer.
            assert_eq!(half.sampled(id), half.sampled(id));
            sampled += usize::from(half.sampled(id));
        }
        assert!((4_500..=5_500).contains(&sampled), "{sampled}");
        assert!(!Sampler::percent(f64::NAN).sampled(new_trace_id()));
        // Low 63 bits below half of 2^63: sampled at 50%.
        assert!(half.sampled(TraceId::from(0x10u128)));
        assert!(!half.sampled(TraceId::from(u128::from(u64::MAX))));
    }

    #[test]
    fn server_names_give_host_and_port() {
        let host = ServerName::new(b"api.example:8080").expect("an authority");
        assert_eq!(host.host_port(), ("api.example", Some(8080)));
        let v6 = ServerName::new(b"[::1]").expect("an authority");
        assert_eq!(v6.host_port(), ("[::1]", None));
        let uri: http::Uri = "http://backend:9090/x".parse().expect("a uri");
        let from_uri = ServerName::from_authority(uri.authority().expect("an authority"));
        assert_eq!(from_uri.host_port(), ("backend", Some(9090)));
        let with_user = ServerName::new(b"user@[fe80::1]:443").expect("an authority");
        assert_eq!(with_user.host_port(), ("[fe80::1]", Some(443)));
        assert_eq!(ServerName::new(b"a b"), None);
        assert_eq!(ServerName::new(b"\xff"), None);
        assert_eq!(ServerName::new(b""), None);
    }

    #[test]
    fn host_headers_take_exactly_the_bytes_of_an_authority() {
        for b in 0..=255u8 {
            let allowed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@[]%".contains(&b);
            assert_eq!(ServerName::new(&[b]).is_some(), allowed, "{b:#04x}");
        }
    }

    #[test]
    fn inline_strs_hold_short_and_long_text() {
        let (fits, too_long) = (
            "x".repeat(InlineStr::INLINE),
            "y".repeat(InlineStr::INLINE + 1),
        );
        for text in [
            "",
            "/",
            "/api/v1/users/42",
            &fits,
            &too_long,
            "/\u{e9}t\u{e9}",
        ] {
            let copy = InlineStr::new(text);
            assert_eq!(copy.as_str(), text);
            assert_eq!(copy.clone(), copy);
        }
    }
}
