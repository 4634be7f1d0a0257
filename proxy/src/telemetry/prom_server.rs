//! The mesh's Prometheus endpoint: the same text as admin `/metrics`, served on the enabled
//! `prometheus` metrics backend's port and path (default `:5670/metrics`), on every address
//! (`0.0.0.0`), because it is there for the mesh's scraper.
//!
//! [`PromServer::apply`] is called with each snapshot's backend and makes the endpoint match
//! it: a new port is bound before the old listener is closed; a changed path applies to the
//! next request; disabling the backend closes the listener. Closing also ends the open
//! connections (Prometheus keeps its scrape connection alive), so a port that was given up
//! serves nothing more. A port that cannot be bound is reported and retried on the next
//! snapshot.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use weft_api::proto::MetricsBackend;

use super::TelemetryError;

/// Produces the exposition text (e.g. `Metrics::encode`).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of prometheus-client's text (OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The default scrape path.
pub const DEFAULT_PATH: &str = "/metrics";

struct Running {
    port: u16,
    addr: SocketAddr,
    path: Arc<ArcSwap<String>>,
    stop: CancellationToken,
}

/// The Prometheus endpoint of the mesh's metrics backend.
pub struct PromServer {
    render: Render,
    ip: IpAddr,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for PromServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromServer")
            .field("ip", &self.ip)
            .field("addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Drop for PromServer {
    fn drop(&mut self) {
        if let Ok(mut r) = self.running.lock()
            && let Some(r) = r.take()
        {
            r.stop.cancel();
        }
    }
}

impl PromServer {
    /// An endpoint serving `render()`, bound on `0.0.0.0` once a backend is applied.
    pub fn new(render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self::with_ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED), render)
    }

    /// The same, bound on `ip`.
    pub fn with_ip(ip: IpAddr, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self {
            render: Arc::new(render),
            ip,
            running: Mutex::new(None),
        }
    }

    /// Where it listens now (`None` when the backend is off or could not be bound).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.running.lock().ok()?.as_ref().map(|r| r.addr)
    }

    /// Makes the endpoint match `backend` (a disabled or absent backend closes it). Port 0
    /// binds an ephemeral port. Needs a tokio runtime to bind.
    pub fn apply(&self, backend: Option<&MetricsBackend>) -> Result<(), TelemetryError> {
        let mut running = self.running.lock().map_err(|_| TelemetryError::Poisoned)?;
        let Some(b) = backend.filter(|b| b.enabled) else {
            if let Some(old) = running.take() {
                old.stop.cancel();
                tracing::info!(addr = %old.addr, "prometheus endpoint closed");
            }
            return Ok(());
        };
        let port = u16::try_from(b.port).map_err(|_| TelemetryError::Backend {
            backend: "prometheus",
            reason: format!("{} is not a port", b.port),
        })?;
        let path = match b.path.trim() {
            "" => DEFAULT_PATH.to_string(),
            p if p.starts_with('/') => p.to_string(),
            p => format!("/{p}"),
        };
        if let Some(r) = running.as_ref()
            && r.port == port
        {
            if **r.path.load() != path {
                tracing::info!(addr = %r.addr, %path, "prometheus endpoint path changed");
                r.path.store(Arc::new(path));
            }
            return Ok(());
        }
        let bound = self.bind(port);
        // The old port is given up either way: the mesh says to serve elsewhere now.
        if let Some(old) = running.take() {
            old.stop.cancel();
        }
        let listener = bound?;
        let addr = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind {
                addr: SocketAddr::new(self.ip, port),
                source,
            })?;
        let path = Arc::new(ArcSwap::from_pointee(path));
        let stop = CancellationToken::new();
        tracing::info!(%addr, path = %path.load(), "prometheus endpoint listening");
        tokio::spawn(serve(
            listener,
            path.clone(),
            self.render.clone(),
            stop.clone(),
        ));
        *running = Some(Running {
            port,
            addr,
            path,
            stop,
        });
        Ok(())
    }

    fn bind(&self, port: u16) -> Result<tokio::net::TcpListener, TelemetryError> {
        tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let addr = SocketAddr::new(self.ip, port);
        let err = |source| TelemetryError::Bind { addr, source };
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        socket.bind(addr).map_err(err)?;
        socket.listen(128).map_err(err)
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    path: Arc<ArcSwap<String>>,
    render: Render,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "prometheus endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (path, render, stop) = (path.clone(), render.clone(), stop.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&req, &path.load(), &render);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn respond<B>(req: &Request<B>, path: &str, render: &Render) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != path {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let mut r = Response::new(Full::new(Bytes::from(render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn backend(port: u16, path: &str, enabled: bool) -> MetricsBackend {
        MetricsBackend {
            enabled,
            name: "prom".into(),
            port: u32::from(port),
            path: path.into(),
            skip_mtls: false,
        }
    }

    /// `GET path` on 127.0.0.1:port: `Err` when the connection is refused, else the status
    /// line and body.
    async fn get(port: u16, path: &str) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    #[tokio::test]
    async fn backend_changes_apply_live() {
        let server = PromServer::new(|| "weft_up 1\n# EOF\n".to_string());
        assert_eq!(server.local_addr(), None);
        let first = free_port();
        server.apply(Some(&backend(first, "", true))).expect("bind");
        assert_eq!(server.local_addr().map(|a| a.port()), Some(first));
        assert!(server.local_addr().is_some_and(|a| a.ip().is_unspecified()));
        let page = get(first, "/metrics").await.expect("serves");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("application/openmetrics-text"), "{page}");
        assert!(page.ends_with("weft_up 1\n# EOF\n"), "{page}");
        assert!(
            get(first, "/other")
                .await
                .expect("serves")
                .starts_with("HTTP/1.1 404")
        );

        // A kept-alive scrape connection is cut when the port is given up.
        let mut kept = tokio::net::TcpStream::connect(("127.0.0.1", first))
            .await
            .expect("connect");
        kept.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        assert!(kept.read(&mut buf).await.expect("answer") > 0);

        // New port: the old one refuses, the new one serves.
        let second = free_port();
        server
            .apply(Some(&backend(second, "/stats", true)))
            .expect("rebind");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get(first, "/metrics").await.is_err(), "old port still open");
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match kept.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "kept-alive connection survived the rebind");
        assert!(
            get(second, "/stats")
                .await
                .expect("serves")
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            get(second, "/metrics")
                .await
                .expect("serves")
                .starts_with("HTTP/1.1 404")
        );

        // Same port, new path: no rebind.
        server
            .apply(Some(&backend(second, "metrics", true)))
            .expect("path");
        assert!(
            get(second, "/metrics")
                .await
                .expect("serves")
                .starts_with("HTTP/1.1 200")
        );

        // Disabled, then absent: closed.
        server
            .apply(Some(&backend(second, "/metrics", false)))
            .expect("off");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get(second, "/metrics").await.is_err());
        assert_eq!(server.local_addr(), None);
        server.apply(None).expect("still off");
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_and_retried() {
        let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let server = PromServer::new(String::new);
        assert!(matches!(
            server.apply(Some(&backend(port, "/metrics", true))),
            Err(TelemetryError::Bind { .. })
        ));
        assert_eq!(server.local_addr(), None);
        drop(taken);
        server
            .apply(Some(&backend(port, "/metrics", true)))
            .expect("retried on the next snapshot");
        assert_eq!(server.local_addr().map(|a| a.port()), Some(port));
    }
}
