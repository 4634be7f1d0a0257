//! Mesh TLS over TCP that holds no buffer while the connection is idle.
//!
//! tokio-rustls drives rustls's buffered connection, whose record deframer keeps a buffer of at
//! least 4 KiB (8 KiB and more right after the certificate flight) for the whole life of the
//! connection, idle or not. With 10,000 idle mesh connections that alone was 40–80 MiB per
//! sidecar: more than everything else a connection holds. [`TlsStream`] drives rustls's
//! unbuffered API instead and keeps TLS bytes in buffers of its own that exist only while bytes
//! are in flight, the way [`crate::copy`] treats its copy buffers:
//! - incoming TLS bytes: a pooled buffer taken when the socket is readable, given back as soon
//!   as it holds no partial record;
//! - decrypted bytes the reader had no room for: kept until read (rare: the copy buffer is
//!   larger than a record);
//! - outgoing TLS bytes: a pooled buffer kept until the socket took them; a write is accepted
//!   only once the previous one is out, which bounds it.
//!
//! What stays per idle connection is rustls's own state (keys, the peer's certificate) and the
//! socket.

use crate::copy::{BUFFER_SIZE, ReadReady, give_back, take_buffer};
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConfig, CommonState, ServerConfig};
use rustls_pki_types::ServerName;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest handshake flight rustls accepts (its own limit for buffered connections).
const MAX_HANDSHAKE_BUFFER: usize = 0xffff + 5;
/// Plaintext taken per write: two full records and their overhead fit one pooled buffer.
const MAX_WRITE: usize = BUFFER_SIZE - 128;

/// The client or server side of an unbuffered rustls connection.
pub trait Side: Send + 'static {
    /// rustls's per-side connection data.
    type Data;
    /// [`rustls::unbuffered::UnbufferedConnectionCommon::process_tls_records`].
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// The negotiated parameters (ALPN, the peer's certificates).
    fn common(&self) -> &CommonState;
}

impl Side for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

impl Side for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

/// A mesh TLS connection on the client side.
pub type ClientTlsStream = TlsStream<UnbufferedClientConnection>;
/// A mesh TLS connection on the server side.
pub type ServerTlsStream = TlsStream<UnbufferedServerConnection>;

/// TLS over a [`TcpStream`], with the buffers described in the module docs.
pub struct TlsStream<C> {
    tcp: TcpStream,
    conn: C,
    /// TLS bytes read and not yet processed (`incoming[..incoming_used]`); empty when idle.
    incoming: Vec<u8>,
    incoming_used: usize,
    /// Decrypted bytes not yet read (`plaintext[plaintext_pos..]`).
    plaintext: Vec<u8>,
    plaintext_pos: usize,
    /// TLS bytes to send (`outgoing[outgoing_pos..outgoing_end]`); empty when idle.
    outgoing: Vec<u8>,
    outgoing_pos: usize,
    outgoing_end: usize,
    /// The peer sent close_notify, or its TCP stream ended (`tcp_eof`).
    peer_closed: bool,
    tcp_eof: bool,
    /// Our close_notify is queued.
    closing: bool,
}

/// Where processing stopped.
enum Step {
    /// The handshake needs more bytes from the peer.
    Handshaking,
    /// Traffic flows; with `wrote`, that many plaintext bytes were encrypted.
    Traffic { wrote: usize },
    /// Both sides sent close_notify.
    Closed,
}

/// Connects as a client: the full handshake, then the stream.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<ClientTlsStream> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    TlsStream::handshake(tcp, conn).await
}

/// Accepts as a server: the full handshake, then the stream.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<ServerTlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    TlsStream::handshake(tcp, conn).await
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<C: Side> TlsStream<C> {
    async fn handshake(tcp: TcpStream, conn: C) -> io::Result<Self> {
        let mut s = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            incoming_used: 0,
            plaintext: Vec::new(),
            plaintext_pos: 0,
            outgoing: Vec::new(),
            outgoing_pos: 0,
            outgoing_end: 0,
            peer_closed: false,
            tcp_eof: false,
            closing: false,
        };
        poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    /// The negotiated parameters (ALPN, the peer's certificates).
    pub fn common(&self) -> &CommonState {
        self.conn.common()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            match self.process(None, None, false)? {
                Step::Handshaking => {
                    // Our flight first: the peer answers it.
                    ready!(self.poll_send(cx))?;
                    if self.incoming_used >= MAX_HANDSHAKE_BUFFER {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "TLS handshake message too large",
                        )));
                    }
                    ready!(self.poll_fill(cx, MAX_HANDSHAKE_BUFFER))?;
                    if self.tcp_eof {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                Step::Traffic { .. } => {
                    ready!(self.poll_send(cx))?;
                    self.release_incoming();
                    return Poll::Ready(Ok(()));
                }
                Step::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "TLS connection closed during the handshake",
                    )));
                }
            }
        }
    }

    /// Runs rustls over the buffered incoming bytes until it needs more of them. Decrypted
    /// bytes go to `out` while it has room, then to `self.plaintext`. Once traffic may flow,
    /// `write` is encrypted into the outgoing buffer, followed by a close_notify with `close`.
    fn process(
        &mut self,
        mut out: Option<&mut ReadBuf<'_>>,
        mut write: Option<&[u8]>,
        close: bool,
    ) -> io::Result<Step> {
        let TlsStream {
            conn,
            incoming,
            incoming_used,
            plaintext,
            plaintext_pos,
            outgoing,
            outgoing_end,
            peer_closed,
            ..
        } = self;
        let mut wrote = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process(&mut incoming[..*incoming_used]);
            let step = match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if plaintext.len() == *plaintext_pos
                            && let Some(out) = out.as_deref_mut()
                        {
                            let n = payload.len().min(out.remaining());
                            out.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        plaintext.extend_from_slice(payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    let free = &mut outgoing[*outgoing_end..];
                    let n = match encode.encode(free) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(e)) => {
                            outgoing.resize(*outgoing_end + e.required_size, 0);
                            encode
                                .encode(&mut outgoing[*outgoing_end..])
                                .map_err(io::Error::other)?
                        }
                        Err(e) => return Err(io::Error::other(e)),
                    };
                    *outgoing_end += n;
                    None
                }
                // The encoded bytes wait in `outgoing`, which is sent before anything else.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Step::Handshaking),
                ConnectionState::PeerClosed => {
                    *peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    *peer_closed = true;
                    Some(Step::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(data) = write.take() {
                        let free = &mut outgoing[*outgoing_end..];
                        let n = match traffic.encrypt(data, free) {
                            Ok(n) => n,
                            Err(EncryptError::InsufficientSize(e)) => {
                                outgoing.resize(*outgoing_end + e.required_size, 0);
                                traffic
                                    .encrypt(data, &mut outgoing[*outgoing_end..])
                                    .map_err(io::Error::other)?
                            }
                            Err(e) => return Err(io::Error::other(e)),
                        };
                        *outgoing_end += n;
                        wrote = data.len();
                    }
                    if close {
                        let n = match traffic.queue_close_notify(&mut outgoing[*outgoing_end..]) {
                            Ok(n) => n,
                            Err(EncryptError::InsufficientSize(e)) => {
                                outgoing.resize(*outgoing_end + e.required_size, 0);
                                traffic
                                    .queue_close_notify(&mut outgoing[*outgoing_end..])
                                    .map_err(io::Error::other)?
                            }
                            Err(e) => return Err(io::Error::other(e)),
                        };
                        *outgoing_end += n;
                    }
                    Some(Step::Traffic { wrote })
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS state (early data is not enabled)",
                    ));
                }
            };
            if discard > 0 {
                incoming.copy_within(discard..*incoming_used, 0);
                *incoming_used -= discard;
            }
            if *plaintext_pos == plaintext.len() && plaintext.capacity() > 0 {
                *plaintext = Vec::new();
                *plaintext_pos = 0;
            }
            if let Some(step) = step {
                return Ok(step);
            }
        }
    }

    /// Reads more TLS bytes from the socket into the incoming buffer (up to `limit`); sets
    /// `tcp_eof` at the end of the stream. Gives the buffer back while it would wait.
    fn poll_fill(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<()>> {
        loop {
            if self.incoming.is_empty() {
                self.incoming = take_buffer().into_vec();
            }
            if self.incoming_used == self.incoming.len() {
                let grown = (self.incoming.len() * 2).min(limit);
                if grown <= self.incoming_used {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS record too large",
                    )));
                }
                self.incoming.resize(grown, 0);
            }
            match self.tcp.try_read(&mut self.incoming[self.incoming_used..]) {
                Ok(0) => {
                    self.tcp_eof = true;
                    self.release_incoming();
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    self.incoming_used += n;
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.release_incoming();
                    ready!(self.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Gives the incoming buffer back when it holds no partial record.
    fn release_incoming(&mut self) {
        if self.incoming_used == 0 && !self.incoming.is_empty() {
            give_back(std::mem::take(&mut self.incoming).into_boxed_slice());
        }
    }

    /// Makes room for outgoing TLS bytes.
    fn prepare_outgoing(&mut self) {
        if self.outgoing.is_empty() {
            self.outgoing = take_buffer().into_vec();
        }
    }

    /// Sends the outgoing TLS bytes; gives the buffer back once they are all out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_pos < self.outgoing_end {
            let n = ready!(
                Pin::new(&mut self.tcp)
                    .poll_write(cx, &self.outgoing[self.outgoing_pos..self.outgoing_end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_pos += n;
        }
        self.outgoing_pos = 0;
        self.outgoing_end = 0;
        if !self.outgoing.is_empty() {
            give_back(std::mem::take(&mut self.outgoing).into_boxed_slice());
        }
        Poll::Ready(Ok(()))
    }

    /// Hands out decrypted bytes kept from an earlier read.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plaintext_pos == self.plaintext.len() {
            return false;
        }
        let n = (self.plaintext.len() - self.plaintext_pos).min(buf.remaining());
        buf.put_slice(&self.plaintext[self.plaintext_pos..self.plaintext_pos + n]);
        self.plaintext_pos += n;
        if self.plaintext_pos == self.plaintext.len() {
            // Rare and small: not worth keeping while idle.
            self.plaintext = Vec::new();
            self.plaintext_pos = 0;
        }
        true
    }
}

impl<C: Side + Unpin> AsyncRead for TlsStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 || this.take_plaintext(buf) {
            return Poll::Ready(Ok(()));
        }
        loop {
            let filled = buf.filled().len();
            if this.incoming_used > 0 {
                this.process(Some(buf), None, false)?;
            }
            // Post-handshake messages (a key update) may want an answer; it goes out with the
            // next write or flush if the socket cannot take it now.
            if this.outgoing_end > 0 {
                let _ = this.poll_send(cx)?;
            }
            if buf.filled().len() > filled || this.take_plaintext(buf) {
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.tcp_eof {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            ready!(this.poll_fill(cx, BUFFER_SIZE))?;
        }
    }
}

impl<C: Side + Unpin> AsyncWrite for TlsStream<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Bounded: new plaintext is taken only once the previous TLS bytes are out.
        ready!(this.poll_send(cx))?;
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        this.prepare_outgoing();
        let wrote = match this.process(None, Some(data), false)? {
            Step::Traffic { wrote } => wrote,
            Step::Handshaking | Step::Closed => {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            }
        };
        // Accepted either way; what the socket cannot take now goes with the next call.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        this.release_incoming();
        Poll::Ready(Ok(wrote))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if !this.closing {
            this.closing = true;
            // No pooled buffer for a 24-byte alert: `process` sizes `outgoing` to fit.
            this.process(None, None, true)?;
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl<C: Side> ReadReady for TlsStream<C> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes already here (decrypted, or whole records), or an end to report.
        if self.plaintext_pos < self.plaintext.len()
            || self.incoming_used > 0
            || self.peer_closed
            || self.tcp_eof
        {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }
}
