//! Sockets: listeners with a deep backlog, upstream connects (optionally from the inbound
//! loop-guard source address), the original destination of redirected connections, and the
//! registry of the proxy's own upstream sockets that keeps it from proxying itself.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Listen backlog: deep enough for 10k connections arriving at once (the kernel caps it at
/// `net.core.somaxconn`).
pub const LISTEN_BACKLOG: i32 = 16384;

/// The source address of the proxy's inbound-side upstream connections in transparent mode;
/// the iptables loop guard (`-s 127.0.0.6 -o lo -j RETURN`) keeps them from being redirected.
pub const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The IPv6 counterpart of [`INBOUND_SOURCE_V4`].
pub const INBOUND_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Binds a listener with `SO_REUSEADDR` and [`LISTEN_BACKLOG`]. IPv6 listeners are v6-only so
/// a v4 listener can share the port.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `addr` within `timeout`, from `source` when given (falling back to the kernel's
/// choice when that address cannot be bound), with `TCP_NODELAY`.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4())
        && let Err(e) = socket.bind(SocketAddr::new(ip, 0))
    {
        tracing::debug!(%ip, error = %e, "cannot bind the upstream source address");
        return Box::pin(connect(addr, None, timeout)).await;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The loop-guard source for an upstream address family.
pub fn inbound_source(upstream: SocketAddr) -> IpAddr {
    match upstream {
        SocketAddr::V4(_) => IpAddr::V4(INBOUND_SOURCE_V4),
        SocketAddr::V6(_) => IpAddr::V6(INBOUND_SOURCE_V6),
    }
}

/// Where a redirected connection was headed.
pub trait OrigDst: Send + Sync + 'static {
    /// The original destination of an accepted connection.
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// Reads `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6), set by iptables
/// `REDIRECT`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoOriginalDst;

impl OrigDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let sock = socket2::SockRef::from(stream);
        let local = stream.local_addr()?;
        let addr = if local.is_ipv4() {
            sock.original_dst_v4()?
        } else {
            sock.original_dst_v6()?
        };
        addr.as_socket()
            .ok_or_else(|| io::Error::other("original destination is not an inet address"))
    }
}

/// The local addresses of the proxy's own outbound upstream sockets. A redirected connection
/// whose peer is one of them is the proxy talking to itself (the uid exemption is missing) and
/// is refused instead of looping.
#[derive(Debug, Default, Clone)]
pub struct OwnSockets(Arc<Mutex<HashSet<SocketAddr>>>);

/// Removes its address from [`OwnSockets`] when dropped.
#[derive(Debug)]
pub struct OwnSocketEntry {
    set: OwnSockets,
    addr: Option<SocketAddr>,
}

impl OwnSockets {
    /// Records `stream`'s local address for as long as the entry lives.
    pub fn register(&self, stream: &TcpStream) -> OwnSocketEntry {
        let addr = stream.local_addr().ok();
        if let (Some(a), Ok(mut set)) = (addr, self.0.lock()) {
            set.insert(a);
        }
        OwnSocketEntry {
            set: self.clone(),
            addr,
        }
    }

    /// Whether `peer` is one of the proxy's own upstream sockets.
    pub fn contains(&self, peer: &SocketAddr) -> bool {
        self.0.lock().map(|s| s.contains(peer)).unwrap_or(false)
    }
}

impl Drop for OwnSocketEntry {
    fn drop(&mut self) {
        if let (Some(a), Ok(mut set)) = (self.addr, self.set.0.lock()) {
            set.remove(&a);
        }
    }
}
