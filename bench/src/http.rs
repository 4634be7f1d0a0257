//! The HTTP/1.1 and HTTP/2 (h2c prior knowledge) client.
//!
//! One hyper connection per lane, keep-alive, `GET` with an empty body; the
//! whole response body is read before the request counts as done.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::load::Client;
use crate::stats::ErrorKind;
use crate::target::{self, TargetError};

/// Which HTTP version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (h2c).
    H2,
}

/// An HTTP load target.
#[derive(Debug, Clone)]
pub struct HttpClient {
    addr: SocketAddr,
    version: Version,
    /// Absolute URI (HTTP/2 needs `:scheme` and `:authority`).
    absolute: Uri,
    /// Origin-form URI (`/path?query`) for HTTP/1.1.
    origin: Uri,
    host: HeaderValue,
}

impl HttpClient {
    /// Resolves `url` (`http://host:port/path`) once; every connection goes to
    /// the resolved address.
    pub async fn new(url: &str, version: Version) -> Result<HttpClient, TargetError> {
        let absolute: Uri = url
            .parse()
            .map_err(|_| TargetError::Url(url.to_owned(), "not a URL"))?;
        match absolute.scheme_str() {
            Some("http") => {}
            Some(_) => {
                return Err(TargetError::Url(
                    url.to_owned(),
                    "only http:// is supported",
                ));
            }
            None => return Err(TargetError::Url(url.to_owned(), "missing http://")),
        }
        let authority = absolute
            .authority()
            .ok_or_else(|| TargetError::Url(url.to_owned(), "missing host"))?
            .clone();
        let port = authority.port_u16().unwrap_or(80);
        let addr = target::resolve(authority.host(), port).await?;
        let origin: Uri = absolute
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .map_err(|_| TargetError::Url(url.to_owned(), "bad path"))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| TargetError::Url(url.to_owned(), "bad host"))?;
        // Normalise an empty path to "/" for HTTP/2 as well.
        let absolute = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(origin.to_string())
            .build()
            .map_err(|_| TargetError::Url(url.to_owned(), "bad URL"))?;
        Ok(HttpClient {
            addr,
            version,
            absolute,
            origin,
            host,
        })
    }

    /// The resolved address connections go to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = Method::GET;
        match self.version {
            Version::Http1 => {
                *req.uri_mut() = self.origin.clone();
                req.headers_mut().insert(header::HOST, self.host.clone());
            }
            Version::H2 => *req.uri_mut() = self.absolute.clone(),
        }
        req
    }
}

/// An open HTTP connection.
#[derive(Debug)]
pub enum HttpConn {
    /// HTTP/1.1.
    H1(http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2.
    H2(http2::SendRequest<Empty<Bytes>>),
}

/// Maps a hyper error to an error kind.
fn classify(e: &hyper::Error) -> ErrorKind {
    if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_parse() || e.is_user() {
        ErrorKind::Protocol
    } else {
        ErrorKind::Io
    }
}

impl Client for HttpClient {
    type Conn = HttpConn;

    async fn connect(&self) -> Result<HttpConn, ErrorKind> {
        let tcp = target::connect_tcp(self.addr).await?;
        let io = TokioIo::new(tcp);
        match self.version {
            Version::Http1 => {
                let (send, conn) = http1::handshake::<_, Empty<Bytes>>(io)
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(HttpConn::H1(send))
            }
            Version::H2 => {
                let (send, conn) = http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), io)
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(HttpConn::H2(send))
            }
        }
    }

    async fn call(&self, conn: &mut HttpConn) -> Result<(), ErrorKind> {
        let req = self.request();
        let resp = match conn {
            HttpConn::H1(send) => {
                send.ready().await.map_err(|e| classify(&e))?;
                send.send_request(req).await
            }
            HttpConn::H2(send) => {
                send.ready().await.map_err(|e| classify(&e))?;
                send.send_request(req).await
            }
        }
        .map_err(|e| classify(&e))?;
        let status = resp.status();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame.map_err(|e| classify(&e))?;
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(ErrorKind::Status)
        }
    }
}
