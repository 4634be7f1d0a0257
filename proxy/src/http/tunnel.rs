//! Upgrade (WebSocket and friends) and CONNECT through the mesh.
//!
//! Between the proxies a tunnel is one HTTP/2 CONNECT stream on the pooled connection: an
//! extended CONNECT carrying the upgrade's protocol in `:protocol` (as RFC 8441 does for
//! WebSocket), or a plain CONNECT to an authority. The inbound proxy turns it back into an
//! HTTP/1.1 Upgrade (or CONNECT) towards its app; the app's `101` (or `2xx`) headers travel
//! back, so `Sec-WebSocket-Accept` reaches the client unchanged. Then both upgraded streams are
//! joined and bytes flow until either side closes.

use crate::datapath::Shared;
use crate::http::body::Body;
use crate::http::idle::{Activity, IdleIo};
use crate::http::inbound::AppClients;
use crate::http::mesh_stream::{OpenStream, StreamIo};
use crate::http::outbound::{Ctx, absolute_uri, authority_of, connect};
use crate::http::{downstream_version, local_response, strip_hop_by_hop};
use crate::route::Service;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::ext::Protocol as ConnectProtocol;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_util::either::Either;

/// The upgrade protocol a request asks for (`Upgrade` with `Connection: upgrade`), except
/// `h2c`, which the proxy handles itself.
fn upgrade_protocol(req: &Request<Incoming>) -> Option<String> {
    upgrade_protocol_of(req.headers()).map(str::to_string)
}

/// [`upgrade_protocol`] of a request's headers.
fn upgrade_protocol_of(headers: &HeaderMap) -> Option<&str> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    let p = headers.get(header::UPGRADE)?.to_str().ok()?.trim();
    (!p.is_empty() && !p.eq_ignore_ascii_case("h2c")).then_some(p)
}

/// Whether a request opens a tunnel: an Upgrade, or CONNECT (plain or extended).
pub(crate) fn is_tunnel(req: &Request<Incoming>) -> bool {
    is_tunnel_head(req.method(), req.headers())
}

/// [`is_tunnel`] of a request head taken apart. An Upgrade is tunnelled when it is a `GET`
/// without a body, as every upgrade in use is (WebSocket's handshake is one): the tunnel
/// carries the head only, and the inbound asks the app with a `GET`. Any other request that
/// offers an Upgrade goes as an ordinary request, the offer dropped with the other
/// hop-by-hop headers, which a proxy may do (RFC 9110, 7.8).
pub(crate) fn is_tunnel_head(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::CONNECT
        || (method == Method::GET && !has_body(headers) && upgrade_protocol_of(headers).is_some())
}

/// Whether a request head says a body follows (`Transfer-Encoding`, or a `Content-Length`
/// other than 0).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// Set by the inbound on its answer to a mesh tunnel whose app declined the upgrade with a
/// `2xx` status (it answered the `GET` as an ordinary request): the status goes in this
/// header, and the answer's own status is `409`, since a `2xx` answer to a CONNECT stream
/// opens the tunnel. The outbound puts the status back and answers the app's request as an
/// ordinary one.
const UPGRADE_DECLINED: http::HeaderName = http::HeaderName::from_static("weft-upgrade-declined");

/// One end of a tunnel: an upgrade that hyper completes once the response is out, or a
/// CONNECT stream to the peer proxy (already open).
enum End {
    Upgrade(OnUpgrade),
    Stream(StreamIo),
}

impl End {
    async fn open(self) -> Result<Either<TokioIo<Upgraded>, StreamIo>, hyper::Error> {
        Ok(match self {
            End::Upgrade(u) => Either::Left(TokioIo::new(u.await?)),
            End::Stream(s) => Either::Right(s),
        })
    }
}

/// Copies between the two ends, once both are open, until either side closes, `stop`
/// resolves, or nothing has moved either way for the idle timeout. The copy is tracked by
/// the drain, so a WebSocket in flight gets the drain window and is cut at its end.
fn spawn_join<S>(shared: &Shared, a: End, b: End, stop: S)
where
    S: Future<Output = ()> + Send + 'static,
{
    let idle_timeout = shared.opts.idle_timeout;
    shared.drain.spawn(async move {
        let (a, b) = match tokio::join!(a.open(), b.open()) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                tracing::debug!(
                    downstream = a.is_ok(),
                    upstream = b.is_ok(),
                    "tunnel upgrade failed"
                );
                return;
            }
        };
        let activity = Activity::default();
        let mut a = IdleIo::new(a, activity.clone());
        let mut b = IdleIo::new(b, activity.clone());
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                }
            }
            () = activity.idle_for(idle_timeout) => tracing::debug!("closing an idle tunnel"),
            () = stop => {}
        }
    });
}

/// The outbound half: the app's Upgrade or CONNECT becomes a CONNECT stream to an endpoint.
pub(crate) async fn outbound(
    ctx: &Ctx,
    svc: &Service,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let extended = req.extensions().get::<ConnectProtocol>().cloned();
    let upgrade = upgrade_protocol(&req);
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, _) = req.into_parts();
    let protocol = extended.map(|p| p.as_str().to_string()).or(upgrade.clone());
    if protocol
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case(crate::http::opaque::PROTOCOL))
    {
        // Reserved for the proxies' own opaque-TCP tunnels.
        return local_response(StatusCode::BAD_REQUEST, "reserved upgrade protocol\n");
    }
    let Some(authority) = authority_of(&parts.uri, &parts.headers) else {
        return local_response(StatusCode::BAD_REQUEST, "no usable authority\n");
    };
    let rule = svc.rule_for(&parts.method, parts.uri.path(), &parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    parts.headers.remove(&crate::http::DOWNSTREAM_PROTOCOL);
    if let Some(r) = rule {
        r.request_headers.apply(&mut parts.headers);
    }
    // Nothing of the app's request but its head goes on; the extended CONNECT's protocol is
    // the one extension the mesh stream carries.
    parts.extensions = http::Extensions::new();
    let uri = match &protocol {
        Some(p) => {
            parts.extensions.insert(h2::ext::Protocol::from(p.as_str()));
            absolute_uri(authority, &parts.uri)
        }
        // On the HTTP/2 hop the authority is `:authority`; the inbound writes `Host` for an
        // HTTP/1.1 app.
        None => Uri::builder().authority(authority).build().ok(),
    };
    let Some(uri) = uri else {
        return local_response(StatusCode::BAD_REQUEST, "no usable authority\n");
    };
    parts.uri = uri;
    parts.method = Method::CONNECT;
    parts.version = Version::HTTP_2;
    let (target, sender) = match connect(ctx, svc, rule).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let req = Request::from_parts(parts, ());
    let opened = match tokio::time::timeout(ctx.shared.opts.request_timeout, sender.open(req)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(endpoint = %target.endpoint.addr, error = %e, "mesh tunnel failed");
            return local_response(StatusCode::BAD_GATEWAY, "upstream request failed\n");
        }
        Err(_) => {
            return local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n");
        }
    };
    let OpenStream {
        response,
        send,
        guard,
    } = opened;
    let (mut rp, recv) = response.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    if let Some(status) = rp.headers.remove(&UPGRADE_DECLINED) {
        // The app answered the upgrade's GET as an ordinary request: so does the client get it.
        rp.status = std::str::from_utf8(status.as_bytes())
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::BAD_GATEWAY);
        rp.version = downstream_version(ctx.http1);
        return Response::from_parts(rp, Body::stream(recv, Some(guard)));
    }
    if !rp.status.is_success() {
        rp.version = downstream_version(ctx.http1);
        return Response::from_parts(rp, Body::stream(recv, Some(guard)));
    }
    if let (Some(p), true) = (&upgrade, ctx.http1) {
        rp.status = StatusCode::SWITCHING_PROTOCOLS;
        rp.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::try_from(p.as_str()) {
            rp.headers.insert(header::UPGRADE, v);
        }
    }
    rp.version = downstream_version(ctx.http1);
    spawn_join(
        &ctx.shared,
        End::Upgrade(downstream),
        End::Stream(StreamIo::new(send, recv, guard)),
        std::future::pending(),
    );
    Response::from_parts(rp, Body::empty())
}

/// The inbound half: a CONNECT stream from the mesh (or an app's Upgrade or CONNECT, from a
/// plaintext client) becomes an HTTP/1.1 Upgrade or CONNECT to the app.
///
/// `stop` ends the tunnel once open: when the rules no longer let the caller in.
pub(crate) async fn inbound<S>(
    shared: &Shared,
    clients: &AppClients,
    mut req: Request<Incoming>,
    upstream_authority: http::uri::Authority,
    stop: S,
) -> Response<Body>
where
    S: Future<Output = ()> + Send + 'static,
{
    let downstream_http1 = req.version() < Version::HTTP_2;
    let protocol = req
        .extensions()
        .get::<ConnectProtocol>()
        .map(|p| p.as_str().to_string())
        .or_else(|| upgrade_protocol(&req));
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, _) = req.into_parts();
    let authority = authority_of(&parts.uri, &parts.headers).unwrap_or(upstream_authority);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&crate::http::DOWNSTREAM_PROTOCOL);
    parts.extensions.remove::<ConnectProtocol>();
    let uri = match &protocol {
        Some(p) => {
            parts.method = Method::GET;
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            match HeaderValue::try_from(p.as_str()) {
                Ok(v) => {
                    parts.headers.insert(header::UPGRADE, v);
                }
                Err(_) => return local_response(StatusCode::BAD_REQUEST, "bad upgrade protocol\n"),
            }
            if let Ok(h) = HeaderValue::try_from(authority.as_str()) {
                parts.headers.insert(header::HOST, h);
            }
            absolute_uri(authority, &parts.uri)
        }
        None => {
            // HTTP/1.1 wants `Host` on a CONNECT too (RFC 9112 §3.2).
            if let Ok(h) = HeaderValue::try_from(authority.as_str()) {
                parts.headers.insert(header::HOST, h);
            }
            Uri::builder().authority(authority).build().ok()
        }
    };
    let Some(uri) = uri else {
        return local_response(StatusCode::BAD_REQUEST, "no usable authority\n");
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let mut resp = match clients
        .http1
        .request(Request::from_parts(parts, Body::empty()))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "app tunnel request failed");
            return local_response(StatusCode::BAD_GATEWAY, "app request failed\n");
        }
    };
    let opened = if protocol.is_some() {
        resp.status() == StatusCode::SWITCHING_PROTOCOLS
    } else {
        resp.status().is_success()
    };
    let app = hyper::upgrade::on(&mut resp);
    let (mut rp, rb) = resp.into_parts();
    if !opened {
        strip_hop_by_hop(&mut rp.headers);
        if !downstream_http1 && rp.status.is_success() {
            // A 2xx on the CONNECT stream would open the tunnel: see `UPGRADE_DECLINED`.
            rp.headers
                .insert(UPGRADE_DECLINED, HeaderValue::from(rp.status.as_u16()));
            rp.status = StatusCode::CONFLICT;
        }
        rp.version = downstream_version(downstream_http1);
        return Response::from_parts(rp, Body::incoming(rb));
    }
    if downstream_http1 {
        // A plaintext HTTP/1.1 client: the app's 101 (or 200) goes back as it is.
        rp.version = Version::HTTP_11;
    } else {
        strip_hop_by_hop(&mut rp.headers);
        rp.status = StatusCode::OK;
        rp.version = Version::HTTP_2;
    }
    spawn_join(shared, End::Upgrade(downstream), End::Upgrade(app), stop);
    Response::from_parts(rp, Body::empty())
}
