//! The outbound HTTP proxy: serves the app's HTTP/1.1 or HTTP/2 connection and sends each
//! request to a mesh endpoint as an HTTP/2 stream over the pool.
//!
//! Per request: header limits (431), the first matching HTTP rule and its request header
//! changes, a subset by weight and an endpoint by the service's balancer, up to
//! [`CONNECT_ATTEMPTS`] endpoints when connecting fails (a failed endpoint is ejected), then
//! the request timeout on the response head (504). Hop-by-hop headers are dropped both ways;
//! `Host`/`:authority` is kept as the app sent it and no `x-forwarded-*` is added.

use crate::balance::InFlight;
use crate::config::ProxyConfig;
use crate::datapath::Shared;
use crate::detect::Protocol;
use crate::http::body::{Body, ByteCount};
use crate::http::coalesce::Coalesce;
use crate::http::idle::{Activity, IdleIo};
use crate::http::mesh_stream::{MeshSender, RequestTimeout, SendError, StreamGuard};
use crate::http::{
    CONNECT_ATTEMPTS, DOWNSTREAM_HTTP1, DOWNSTREAM_PROTOCOL, MAX_HEADER_BYTES, MAX_HEADERS,
    downstream_version, local_response, strip_hop_by_hop, tunnel,
};
use crate::route::{HttpRule, Service, Target};
use crate::telemetry::{Direction, RequestObservation};
use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};

/// What every request of one app connection shares.
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) cfg: Arc<ProxyConfig>,
    /// The mesh service the connection is for (shared: each request's span names it).
    pub(crate) service: Arc<str>,
    /// Whether the app speaks HTTP/1.x (else HTTP/2).
    pub(crate) http1: bool,
}

/// Serves one app connection that detection found to carry `protocol` (HTTP/1 or HTTP/2).
pub(crate) async fn serve<I>(
    shared: Arc<Shared>,
    cfg: Arc<ProxyConfig>,
    io: I,
    protocol: Protocol,
    service: String,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = shared.drain.clone();
    let idle_timeout = shared.opts.idle_timeout;
    let conn = Arc::new(ArcSwap::from_pointee(Ctx {
        shared,
        cfg,
        service: Arc::from(service),
        http1: protocol == Protocol::Http1,
    }));
    let handler = move |req| {
        let ctx = current(&conn);
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    };
    serve_connection(io, protocol, handler, &drain, idle_timeout).await;
}

/// How long an idle HTTP connection's graceful close may take before it is dropped.
const IDLE_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs hyper's server side of one connection, answering each request with `handler`, until
/// it ends; on drain, finishes the requests in flight and closes (HTTP/1: after the current
/// response; HTTP/2: GOAWAY).
///
/// Over HTTP/2, hyper spawns a task per stream around the handler's future and moves it
/// whole, into the task and again each time the task's stage changes; a request's future is
/// some kilobytes (the request, its parts, and the send to the next hop, nested), so it is
/// boxed there: one allocation that stays put instead of kilobytes copied several times per
/// request. Over HTTP/1 the connection keeps one future slot for its requests, so a box
/// would only add an allocation.
pub(crate) async fn serve_connection<I, F, Fut>(
    io: I,
    protocol: Protocol,
    handler: F,
    drain: &crate::drain::Drain,
    idle_timeout: std::time::Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let activity = Activity::default();
    let io = IdleIo::new(io, activity.clone());
    // Ends the connection gracefully on drain or after the idle timeout, then waits for it.
    macro_rules! run {
        ($conn:expr) => {{
            let mut conn = std::pin::pin!($conn);
            tokio::select! {
                r = conn.as_mut() => r,
                () = drain.draining() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = activity.idle_for(idle_timeout) => {
                    tracing::debug!("closing an idle HTTP connection");
                    conn.as_mut().graceful_shutdown();
                    // A graceful close waits for the exchange in progress: a request head
                    // never finished, or a stream gone quiet, would hold the connection
                    // forever. Nothing has moved for the whole timeout, so it gets a moment,
                    // then is dropped.
                    match tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            }
        }};
    }
    let result = if protocol == Protocol::Http1 {
        run!(
            http1::Builder::new()
                .timer(TokioTimer::new())
                // hyper's default of 30 s runs from the moment the connection waits for a
                // request head, so it closed every keep-alive connection idle for 30 s:
                // `idle_timeout` (Kuma's 1 h) is the limit instead. Envoy also has no header
                // read timeout by default. It also saves arming a timer per request.
                .header_read_timeout(None)
                .max_buf_size(MAX_HEADER_BYTES)
                .max_headers(MAX_HEADERS)
                .serve_connection(TokioIo::new(io), service_fn(handler))
                .with_upgrades()
        )
    } else {
        run!(
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .initial_stream_window_size(crate::http::STREAM_WINDOW)
                .initial_connection_window_size(crate::http::CONNECTION_WINDOW)
                .max_concurrent_streams(crate::http::pool::MAX_STREAMS_PER_CONNECTION)
                .enable_connect_protocol()
                // Each turn of the connection goes out in one write (see `coalesce`).
                .serve_connection(
                    TokioIo::new(Coalesce::new(io)),
                    service_fn(move |req| Box::pin(handler(req))),
                )
        )
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// The authority a request is for: the URI's, else the `Host` header's.
pub(crate) fn authority_of(uri: &Uri, headers: &HeaderMap) -> Option<Authority> {
    uri.authority().cloned().or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
    })
}

/// An absolute `http://authority/path?query` URI.
pub(crate) fn absolute_uri(authority: Authority, uri: &Uri) -> Option<Uri> {
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .ok()
}

/// The connection's context for its next request, under the config in force now: each
/// request follows the config of when it arrives, not the one its connection was accepted
/// under, since a keep-alive or gRPC connection lives long and a route, weight or endpoint
/// change must reach its next request. The connection keeps the refreshed context, so only
/// the first request after a change builds one.
fn current(conn: &ArcSwap<Ctx>) -> Arc<Ctx> {
    let ctx = conn.load_full();
    let config = ctx.shared.config.load();
    if Arc::ptr_eq(&config, &ctx.cfg) {
        return ctx;
    }
    let fresh = Arc::new(Ctx {
        shared: ctx.shared.clone(),
        cfg: Arc::clone(&config),
        service: ctx.service.clone(),
        http1: ctx.http1,
    });
    conn.store(fresh.clone());
    fresh
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    // The proxy's own answers to a gRPC call are in gRPC's terms.
    if crate::http::is_grpc(req.headers()) {
        return crate::http::for_grpc_caller(handle_request(ctx, req).await);
    }
    handle_request(ctx, req).await
}

async fn handle_request(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    if req.headers().len() > MAX_HEADERS {
        return local_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too many header fields\n",
        );
    }
    let Some(svc) = ctx.cfg.services.get(&*ctx.service) else {
        return local_response(StatusCode::SERVICE_UNAVAILABLE, "unknown mesh service\n");
    };
    if tunnel::is_tunnel(&req) {
        // Boxed: a rare path with a large future (see `MeshPool::get`).
        return Box::pin(tunnel::outbound(&ctx, svc, req)).await;
    }
    let (mut parts, body) = req.into_parts();
    let authority = match authority_of(&parts.uri, &parts.headers) {
        Some(a) => Some(a),
        // An HTTP/1.1 request must name its host, and a `Host` that is not an authority is
        // an error (RFC 9112 §3.2: 400); an HTTP/1.0 one (or an h2 one without
        // `:authority`) goes to the service by its name.
        None if parts.version == Version::HTTP_11 || parts.headers.contains_key(header::HOST) => {
            return local_response(StatusCode::BAD_REQUEST, "missing or invalid Host\n");
        }
        None => Authority::try_from(&*ctx.service).ok(),
    };
    let Some(uri) = authority.and_then(|a| absolute_uri(a, &parts.uri)) else {
        return local_response(StatusCode::BAD_REQUEST, "no usable authority\n");
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&DOWNSTREAM_PROTOCOL);
    // 100-continue was answered to the app by hyper as the body was first read.
    parts.headers.remove(header::EXPECT);
    let telemetry = &ctx.cfg.telemetry;
    let mut observation = telemetry.begin(
        Direction::Outbound,
        &ctx.service,
        Some(&ctx.service),
        &parts.method,
        &parts.uri,
        &mut parts.headers,
    );
    let rule = svc.rule_for(&parts.method, parts.uri.path(), &parts.headers);
    if let Some(r) = rule {
        r.request_headers.apply(&mut parts.headers);
    }
    parts.headers.remove(header::HOST);
    if ctx.http1 {
        parts.headers.insert(DOWNSTREAM_PROTOCOL, DOWNSTREAM_HTTP1);
    }
    parts.uri = uri;
    parts.version = Version::HTTP_2;

    let mut body = Body::incoming(body);
    let request_bytes = telemetry.access_log_enabled().then(ByteCount::default);
    if let Some(c) = &request_bytes {
        body = body.count_into(c.clone());
    }
    let req = Request::from_parts(parts, body);
    let began = observation.started();
    let ((resp, open), in_flight, endpoint) = match send(&ctx, svc, rule, req, began).await {
        Ok(r) => r,
        Err(local) => return observed(local, observation),
    };
    in_flight.observe();
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    if let Some(r) = rule {
        r.response_headers.apply(&mut rp.headers);
    }
    rp.version = downstream_version(ctx.http1);
    observation.status(rp.status.as_u16());
    observation.peer_address(endpoint);
    let body = Body::stream(rb, Some(open))
        .hold(in_flight)
        .idle_timeout(ctx.shared.opts.stream_idle_timeout)
        .finish(observation, request_bytes);
    Response::from_parts(rp, body)
}

/// A response the proxy made itself, with its observation finished.
pub(crate) fn observed(
    resp: Response<Body>,
    mut observation: RequestObservation,
) -> Response<Body> {
    observation.status(resp.status().as_u16());
    observation.finish(0, 0, None);
    resp
}

/// Sends `req` to an endpoint and waits for the response head. A request the connection
/// hands back unsent (it closed under us) goes to another endpoint; one that was sent is never
/// retried, as it may not be idempotent.
async fn send(
    ctx: &Ctx,
    svc: &Service,
    rule: Option<&HttpRule>,
    mut req: Request<Body>,
    began: std::time::Instant,
) -> Result<
    (
        (Response<h2::RecvStream>, StreamGuard),
        InFlight,
        SocketAddr,
    ),
    Response<Body>,
> {
    // Connecting is bounded by the request timeout from the request's arrival (`began`), so
    // endpoints that take TCP connections and never finish the handshake cannot hold a
    // request for attempts × (connect + handshake) timeouts; the wait for the response head
    // by the same timeout from the end of the request ([`RequestTimeout`]: a request still
    // sending its body is not cut). `began` spares a clock read.
    let timeout = RequestTimeout {
        began,
        limit: ctx.shared.opts.request_timeout,
        idle: ctx.shared.opts.stream_idle_timeout,
    };
    let deadline = crate::http::request_deadline(began, timeout.limit);
    let timed_out = || local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n");
    for _ in 0..CONNECT_ATTEMPTS {
        // A pooled connection with room answers at the first poll: the deadline's timer is
        // set up only when connecting has to wait.
        let mut connecting = std::pin::pin!(connect(ctx, svc, rule));
        let (target, sender) = match futures::poll!(connecting.as_mut()) {
            Poll::Ready(got) => got?,
            Poll::Pending => match tokio::time::timeout_at(deadline, connecting).await {
                Ok(got) => got?,
                Err(_) => return Err(timed_out()),
            },
        };
        let in_flight = target.endpoint.start();
        match sender.send(req, Some(timeout)).await {
            Ok(resp) => return Ok((resp, in_flight, target.endpoint.addr)),
            Err(SendError::Unsent { request, source }) => {
                tracing::debug!(service = %ctx.service, endpoint = %target.endpoint.addr,
                    error = %source, "connection closed before the request went out; retrying");
                req = *request;
            }
            Err(SendError::TimedOut) => return Err(timed_out()),
            Err(e) => {
                tracing::debug!(service = %ctx.service, endpoint = %target.endpoint.addr,
                    error = %e, "mesh request failed");
                return Err(local_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream request failed\n",
                ));
            }
        }
    }
    Err(local_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "no endpoint reachable\n",
    ))
}

/// Picks an endpoint for the request and gets a pooled connection to it, trying up to
/// [`CONNECT_ATTEMPTS`] endpoints.
pub(crate) async fn connect<'s>(
    ctx: &Ctx,
    svc: &'s Service,
    rule: Option<&'s HttpRule>,
) -> Result<(Target<'s>, MeshSender), Response<Body>> {
    let mut failed: Vec<SocketAddr> = Vec::new();
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(target) = svc.pick_for(rule, &failed) else {
            break;
        };
        let got = ctx
            .shared
            .pool
            .get(
                &ctx.shared,
                &ctx.cfg.mesh,
                ctx.cfg.mtls.is_some(),
                target.service,
                target.endpoint,
            )
            .await;
        match got {
            Ok(sender) => return Ok((target, sender)),
            Err(e) => {
                tracing::info!(service = %ctx.service, error = %e, "endpoint unusable; trying another");
                failed.push(target.endpoint.addr);
            }
        }
    }
    let reason = if failed.is_empty() {
        "no healthy endpoint\n"
    } else {
        "no endpoint reachable\n"
    };
    Err(local_response(StatusCode::SERVICE_UNAVAILABLE, reason))
}
