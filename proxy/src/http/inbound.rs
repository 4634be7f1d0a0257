//! The inbound HTTP proxy: serves HTTP/2 streams from mesh peers (or a plaintext HTTP client,
//! where the mesh lets one in) and forwards each request to the local app in the app's own
//! protocol: HTTP/1.1 requests over the inbound's own keep-alive pool ([`app_pool`]), h2c,
//! Upgrade and CONNECT over hyper's pooled client.
//!
//! The source's permission is decided per connection (its certificate) and applied to every
//! request, and decided again for the next request after a config change, since pooled
//! connections live long: a denied source gets 403 and is counted in `weft_authz_denied_total`.
//! The same connections carry opaque-TCP tunnels ([`crate::http::opaque`]), answered here by
//! connecting to the app.

use crate::config::{Authz, Inbound, MtlsMode, ProxyConfig};
use crate::datapath::Shared;
use crate::datapath_metrics::INBOUND;
use crate::detect::Protocol;
use crate::http::app_h2c::{H2cClient, H2cError};
use crate::http::app_pool::{self, AppConnector, Http1Pool};
use crate::http::body::{Body, ByteCount};
use crate::http::mesh_stream::RequestTimeout;
use crate::http::outbound::observed;
use crate::http::outbound::{absolute_uri, authority_of, serve_connection};
use crate::http::{
    DOWNSTREAM_HTTP1, DOWNSTREAM_PROTOCOL, MAX_HEADERS, MESH_ADDED_HEADERS, downstream_version,
    local_response, opaque, strip_hop_by_hop, tunnel,
};
use crate::listen;
use crate::outbound::forward_until;
use crate::telemetry::{Direction, RequestObservation};
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Pooled clients to one app address: HTTP/1.1 and h2c.
#[derive(Clone)]
pub struct AppClients {
    /// HTTP/1.1 requests.
    pub http1_pool: Http1Pool,
    /// HTTP/1.1 for Upgrade and CONNECT, whose connections are never reused.
    pub http1: Client<AppConnector, Body>,
    /// h2c, prior knowledge.
    pub http2: H2cClient,
}

impl AppClients {
    fn new(upstream: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Self {
        let connector = AppConnector::new(upstream, source, timeout);
        let http1_pool = Http1Pool::new(connector.clone());
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .pool_idle_timeout(app_pool::IDLE)
            .set_host(false);
        let http1 = b.build(connector);
        let http2 = H2cClient::new(upstream, source, timeout);
        Self {
            http1_pool,
            http1,
            http2,
        }
    }
}

/// The app clients of every inbound, kept across config changes so pooled app connections
/// survive them.
#[derive(Default)]
pub struct AppClientRegistry {
    clients: Mutex<HashMap<(SocketAddr, Option<IpAddr>), AppClients>>,
}

impl std::fmt::Debug for AppClientRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppClientRegistry").finish_non_exhaustive()
    }
}

impl AppClientRegistry {
    /// The clients for `upstream`, connecting from `source`. Called once per downstream
    /// connection, not per request.
    pub fn get(
        &self,
        upstream: SocketAddr,
        source: Option<IpAddr>,
        timeout: Duration,
    ) -> AppClients {
        let Ok(mut map) = self.clients.lock() else {
            return AppClients::new(upstream, source, timeout);
        };
        map.entry((upstream, source))
            .or_insert_with(|| AppClients::new(upstream, source, timeout))
            .clone()
    }

    /// Forgets the clients of apps no inbound points at any more (a config dropped or moved
    /// the inbound), so that the registry does not grow with every change; connections that
    /// still use them keep their own handles until they end.
    pub fn retain_upstreams(&self, keep: impl Fn(SocketAddr) -> bool) {
        if let Ok(mut map) = self.clients.lock() {
            map.retain(|(upstream, _), _| keep(*upstream));
        }
    }

    /// How many apps have clients.
    pub fn len(&self) -> usize {
        self.clients.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no app has clients.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Ctx {
    shared: Arc<Shared>,
    /// The config the connection started under, which `denied` was decided by.
    cfg: Arc<ProxyConfig>,
    /// The inbound's port (its key in the config).
    port: u16,
    service: String,
    app_protocol: Option<Protocol>,
    upstream: SocketAddr,
    /// The address connections to the app come from (`127.0.0.6` in transparent mode).
    source: Option<IpAddr>,
    /// `upstream` as an authority, for requests that name none.
    upstream_authority: Option<Authority>,
    clients: AppClients,
    /// `Some(origin)` when the source is denied.
    denied: Option<Option<String>>,
    sources: Vec<String>,
    /// The first of `sources`, shared with each request's span (`peer.service`).
    peer_service: Option<Arc<str>>,
    peer: Option<SocketAddr>,
    telemetry: crate::telemetry::Telemetry,
}

/// Who is calling, as far as the connection tells.
#[derive(Debug, Default)]
pub(crate) struct Caller {
    /// The services in the client certificate (empty for plaintext).
    pub(crate) sources: Vec<String>,
    /// `Some(policy)` when the permissions deny the caller (`Some(None)`: no rule allows).
    pub(crate) denied: Option<Option<String>>,
    /// The caller's address.
    pub(crate) peer: Option<SocketAddr>,
}

/// Serves one connection to `inbound` that carries HTTP (`protocol`: HTTP/1 or HTTP/2).
pub(crate) async fn serve<I>(
    shared: Arc<Shared>,
    cfg: Arc<ProxyConfig>,
    inbound: &Inbound,
    io: I,
    protocol: Protocol,
    caller: Caller,
    transparent: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let source = transparent.then(|| listen::inbound_source(inbound.upstream));
    let clients = shared
        .app_clients
        .get(inbound.upstream, source, shared.opts.connect_timeout);
    let drain = shared.drain.clone();
    let idle_timeout = shared.opts.idle_timeout;
    let ctx = Arc::new(Ctx {
        shared,
        port: inbound.port,
        service: inbound.service.clone(),
        app_protocol: inbound.protocol,
        upstream: inbound.upstream,
        source,
        upstream_authority: Authority::try_from(inbound.upstream.to_string().as_str()).ok(),
        clients,
        denied: caller.denied,
        peer_service: caller.sources.first().map(|s| Arc::from(s.as_str())),
        sources: caller.sources,
        peer: caller.peer,
        telemetry: cfg.telemetry.clone(),
        cfg,
    });
    let handler = move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    };
    serve_connection(io, protocol, handler, &drain, idle_timeout).await;
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    // The proxy's own answers to a gRPC call are in gRPC's terms.
    if crate::http::is_grpc(req.headers()) {
        return crate::http::for_grpc_caller(handle_request(ctx, req).await);
    }
    handle_request(ctx, req).await
}

async fn handle_request(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    if ctx.peer_is_mesh() && opaque::is_tunnel(&req) {
        return accept_tunnel(&ctx, req).await;
    }
    let (mut parts, body) = req.into_parts();
    // Counted as they came: the trace headers `begin` writes for the app are the mesh's, and
    // the peer's outbound checked the app's own fields against the limit, then may have
    // added two of its own (`weft-downstream-protocol`, `traceparent`).
    let too_many_headers = parts.headers.len() > MAX_HEADERS + MESH_ADDED_HEADERS;
    let observation = ctx.telemetry.begin(
        Direction::Inbound,
        &ctx.service,
        ctx.peer_service.as_ref(),
        &parts.method,
        &parts.uri,
        &mut parts.headers,
    );
    if too_many_headers {
        return observed(
            local_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields\n",
            ),
            observation,
        );
    }
    forward(&ctx, parts, body, observation).await
}

impl Ctx {
    /// Whether the caller is a mesh proxy (it showed a mesh certificate).
    fn peer_is_mesh(&self) -> bool {
        !self.sources.is_empty()
    }

    /// The permissions' verdict on the caller under the config in force now: `Some(origin)`
    /// when denied. The connection's own verdict while the config is the one it started
    /// under; decided again after a change, so that a pooled connection, which lives long,
    /// follows changed permissions from its next request on.
    ///
    /// A caller without a certificate (plaintext, under PERMISSIVE or with mTLS off) is
    /// refused once the mesh's mTLS has become STRICT, or its inbound is gone: its connection
    /// was let in under rules that no longer hold.
    fn denied_now(&self) -> Option<Option<String>> {
        let cfg = self.shared.config.load();
        if Arc::ptr_eq(&cfg, &self.cfg) {
            return self.denied.clone();
        }
        denied_under(&cfg, self.port, &self.sources)
    }
}

/// The verdict under `cfg` on a caller of the inbound on `port` that showed a certificate for
/// the mesh services `sources` (none: a plaintext caller): `Some(origin)` when denied.
///
/// A plaintext caller is refused once the mesh's mTLS is STRICT, or the inbound is gone.
pub(crate) fn denied_under(
    cfg: &ProxyConfig,
    port: u16,
    sources: &[String],
) -> Option<Option<String>> {
    let inbound = cfg.inbounds.get(&port);
    if sources.is_empty() {
        if cfg.mtls == Some(MtlsMode::Strict) {
            return Some(Some("mTLS is STRICT: plaintext refused".into()));
        }
        return inbound.is_none().then_some(None);
    }
    match inbound {
        // With mTLS off no permission applies, as in Kuma.
        Some(_) if cfg.mtls.is_none() => None,
        Some(inbound) => match inbound.authorize(sources) {
            Authz::Allow(_) => None,
            Authz::Deny(origin) => Some(origin),
        },
        None => Some(None),
    }
}

/// Resolves when the rules in force no longer let the caller in (see [`Shared::revoked`]),
/// after logging and counting it as a denial.
pub(crate) async fn revoked(shared: &Shared, port: u16, sources: &[String]) {
    shared
        .revoked(|cfg| denied_under(cfg, port, sources).is_none())
        .await;
    tracing::info!(
        ?sources,
        port,
        "connection closed: the mesh's rules no longer let it in"
    );
    shared.metrics.authz_denied.inc();
}

/// An opaque-TCP tunnel from a mesh peer ([`opaque`]): allowed by the permissions, it is
/// answered `200` once the app is connected, and its bytes are copied in a task of its own,
/// tracked by the drain. Refused: `403`, counted like a refused connection.
async fn accept_tunnel(ctx: &Ctx, mut req: Request<Incoming>) -> Response<Body> {
    if let Some(origin) = ctx.denied_now() {
        tracing::info!(sources = ?ctx.sources, service = %ctx.service, ?origin,
            "tunnel denied by the mesh's permissions");
        ctx.shared.metrics.authz_denied.inc();
        return local_response(StatusCode::FORBIDDEN, "denied by the mesh's permissions\n");
    }
    let timeout = ctx.shared.opts.connect_timeout;
    let app = match listen::connect(ctx.upstream, ctx.source, timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(service = %ctx.service, upstream = %ctx.upstream, error = %e,
                "cannot reach the app");
            return local_response(StatusCode::BAD_GATEWAY, "cannot reach the app\n");
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let shared = ctx.shared.clone();
    let telemetry = ctx.telemetry.clone();
    let service = ctx.service.clone();
    let source = ctx.sources.first().cloned();
    let (port, sources) = (ctx.port, ctx.sources.clone());
    ctx.shared.drain.spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "tunnel stream ended before it opened");
                return;
            }
        };
        let _active = shared.metrics.opened(INBOUND, Protocol::Opaque.label());
        let start = std::time::SystemTime::now();
        let began = std::time::Instant::now();
        let tunnel = opaque::Tunnel::upgraded(upgraded);
        let stop = revoked(&shared, port, &sources);
        let (sent, received) = forward_until(&shared, INBOUND, tunnel, app, Vec::new(), stop).await;
        telemetry.connection(
            Direction::Inbound,
            &service,
            source.as_deref(),
            start,
            began.elapsed(),
            sent,
            received,
        );
    });
    Response::new(Body::empty())
}

async fn forward(
    ctx: &Ctx,
    mut parts: http::request::Parts,
    body: Incoming,
    mut observation: RequestObservation,
) -> Response<Body> {
    if let Some(peer) = ctx.peer {
        observation.peer_address(peer);
    }
    if let Some(origin) = ctx.denied_now() {
        tracing::info!(sources = ?ctx.sources, service = %ctx.service, ?origin,
            "request denied by the mesh's permissions");
        ctx.shared.metrics.authz_denied.inc();
        return observed(
            local_response(StatusCode::FORBIDDEN, "denied by the mesh's permissions\n"),
            observation,
        );
    }
    let downstream_http1 = parts.version < Version::HTTP_2;
    let upstream_authority = ctx.upstream_authority.clone();
    if tunnel::is_tunnel_head(&parts.method, &parts.headers) {
        let Some(a) = upstream_authority else {
            return observed(
                local_response(StatusCode::BAD_GATEWAY, "bad app address\n"),
                observation,
            );
        };
        let req = Request::from_parts(parts, body);
        let (shared, port, sources) = (ctx.shared.clone(), ctx.port, ctx.sources.clone());
        let stop = async move { revoked(&shared, port, &sources).await };
        let answer = tunnel::inbound(&ctx.shared, &ctx.clients, req, a, stop).await;
        return observed(answer, observation);
    }
    let caller_http1 =
        downstream_http1 || parts.headers.get(&DOWNSTREAM_PROTOCOL) == Some(&DOWNSTREAM_HTTP1);
    let app_http2 = match ctx.app_protocol {
        Some(Protocol::Http2) => true,
        Some(Protocol::Http1) => false,
        _ => !caller_http1,
    };
    parts.headers.remove(&DOWNSTREAM_PROTOCOL);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::EXPECT);
    let Some(authority) = authority_of(&parts.uri, &parts.headers).or(upstream_authority) else {
        return observed(
            local_response(StatusCode::BAD_REQUEST, "no usable authority\n"),
            observation,
        );
    };
    if app_http2 {
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        // The request target's (or `:authority`'s) authority wins over a `Host` that says
        // otherwise (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
        if let Ok(h) = HeaderValue::try_from(authority.as_str()) {
            parts.headers.insert(header::HOST, h);
        }
        parts.version = Version::HTTP_11;
    }
    // h2c carries the authority in the URI (`:authority`); HTTP/1.1 in `Host`, with the
    // path alone as the request target.
    parts.uri = if app_http2 {
        let Some(uri) = absolute_uri(authority, &parts.uri) else {
            return observed(
                local_response(StatusCode::BAD_REQUEST, "no usable authority\n"),
                observation,
            );
        };
        uri
    } else {
        app_pool::origin_form(&parts.uri)
    };
    let mut body = Body::incoming(body);
    let request_bytes = ctx.telemetry.access_log_enabled().then(ByteCount::default);
    if let Some(c) = &request_bytes {
        body = body.count_into(c.clone());
    }
    // The caller's own proxy bounds a mesh caller's request (Kuma's 15 s, then 504 and a
    // reset); a plaintext caller (PERMISSIVE, or a mesh with mTLS off) has none, and the
    // request timeout is applied here, from the end of the request as on the mesh hop: by the
    // h2c client (`RequestTimeout`), and for an HTTP/1.1 app below, once the body has ended.
    let plaintext_timeout = (!ctx.peer_is_mesh()).then(|| RequestTimeout {
        began: observation.started(),
        limit: ctx.shared.opts.request_timeout,
        idle: ctx.shared.opts.stream_idle_timeout,
    });
    let body_ended = match plaintext_timeout {
        Some(_) if !app_http2 && !hyper::body::Body::is_end_stream(&body) => {
            let (tell, ended) = tokio::sync::oneshot::channel();
            body = body.on_end(tell);
            Some(ended)
        }
        _ => None,
    };
    let req = Request::from_parts(parts, body);
    let send = async {
        if app_http2 {
            ctx.clients
                .http2
                .send(req, plaintext_timeout)
                .await
                .map(|(r, open)| r.map(|stream| Body::stream(stream, Some(open))))
                .map_err(|e| match e {
                    H2cError::TimedOut { .. } => None,
                    e => Some(e.to_string()),
                })
        } else {
            ctx.clients
                .http1_pool
                .send(req)
                .await
                .map(|r| r.map(Body::app))
                .map_err(|e| Some(e.to_string()))
        }
    };
    // An error is `None` when the request timed out.
    let sent = match plaintext_timeout {
        Some(t) if !app_http2 => {
            // From the arrival for a request without a body; from the end of its body
            // otherwise, so that an upload longer than the timeout is not cut while it is
            // still sending (a stalled one is ended by the connection's idle timeout).
            let expired = async {
                match body_ended {
                    None => {
                        tokio::time::sleep_until(crate::http::request_deadline(t.began, t.limit))
                            .await
                    }
                    Some(ended) => {
                        let _ = ended.await;
                        tokio::time::sleep(t.limit).await;
                    }
                }
            };
            tokio::select! {
                sent = send => sent,
                () = expired => Err(None),
            }
        }
        _ => send.await,
    };
    let resp = match sent {
        Ok(r) => r,
        Err(None) => {
            return observed(
                local_response(StatusCode::GATEWAY_TIMEOUT, "app request timeout\n"),
                observation,
            );
        }
        Err(Some(error)) => {
            tracing::warn!(service = %ctx.service, upstream = %ctx.upstream, %error,
                "app request failed");
            return observed(
                local_response(StatusCode::BAD_GATEWAY, "app request failed\n"),
                observation,
            );
        }
    };
    let (mut rp, body) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    rp.version = downstream_version(downstream_http1);
    observation.status(rp.status.as_u16());
    let body = body.finish(observation, request_bytes);
    Response::from_parts(rp, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_registry_forgets_apps_no_inbound_points_at() {
        let registry = AppClientRegistry::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let timeout = Duration::from_secs(1);
        registry.get(a, None, timeout);
        registry.get(b, None, timeout);
        registry.get(b, Some("127.0.0.6".parse().unwrap()), timeout);
        assert_eq!(registry.len(), 3);
        registry.retain_upstreams(|up| up == b);
        assert_eq!(registry.len(), 2);
        registry.retain_upstreams(|_| false);
        assert!(registry.is_empty());
    }
}
