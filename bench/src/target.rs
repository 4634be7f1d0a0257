//! Resolving targets and opening TCP connections, shared by all clients.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::stats::ErrorKind;

/// A target that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL or address is malformed.
    #[error("invalid target {0:?}: {1}")]
    Url(String, &'static str),
    /// The host name does not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
}

/// Resolves `host:port` to its first address.
pub async fn resolve(host: &str, port: u16) -> Result<SocketAddr, TargetError> {
    // `Uri` keeps IPv6 literals bracketed; lookup_host wants them bare.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| TargetError::Resolve(host.to_owned(), e))?;
    addrs.next().ok_or_else(|| {
        TargetError::Resolve(
            host.to_owned(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        )
    })
}

/// Resolves `host:port` (or `[v6]:port`) given as one string.
pub async fn resolve_authority(authority: &str) -> Result<SocketAddr, TargetError> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| TargetError::Url(authority.to_owned(), "expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| TargetError::Url(authority.to_owned(), "bad port"))?;
    resolve(host, port).await
}

/// Opens a TCP connection with Nagle off (every request is latency-bound).
pub async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, ErrorKind> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| ErrorKind::Connect)?;
    stream.set_nodelay(true).map_err(|_| ErrorKind::Connect)?;
    Ok(stream)
}
