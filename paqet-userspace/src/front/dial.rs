//! The dialing abstraction the proxy front ends ([`super::socks5`], [`super::http`]) are generic over.
//!
//! - [`Dialer`]: opens a byte stream or a datagram channel to `host:port`, the host being the literal string
//!   carried in the paqet header (domain, dotted IPv4, or IPv6 without brackets; spec §3.7).
//! - [`DatagramChannel`]: one datagram per call, both ways (a PUDP stream carries one datagram per smux
//!   frame, spec §3.8).
//!
//! Two implementations: [`Tunnel`] (through the paqet tunnel; names resolved by the server) and
//! [`DirectDialer`] (plain local sockets; used by tests and usable as a "direct" mode).
//!
//! Everything runs on a current-thread runtime inside a `LocalSet`, so nothing here is `Send`.
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{lookup_host, TcpStream, UdpSocket};

use crate::worker::{Tunnel, TunnelStream, DIAL_TIMEOUT, MAX_UDP_DATAGRAM};

/// A datagram channel to one fixed target.
#[allow(async_fn_in_trait)] // single-threaded runtime: no `Send` bound wanted
pub trait DatagramChannel {
    /// Sends one datagram (at most [`MAX_UDP_DATAGRAM`] bytes).
    async fn send(&self, data: &[u8]) -> io::Result<()>;
    /// Receives one datagram; `Ok(None)` = the channel ended.
    async fn recv(&self) -> io::Result<Option<Vec<u8>>>;
}

/// Opens streams and datagram channels to `host:port`.
#[allow(async_fn_in_trait)] // single-threaded runtime: no `Send` bound wanted
pub trait Dialer {
    /// A byte stream to the target.
    type Stream: AsyncRead + AsyncWrite + Unpin;
    /// A datagram channel to the target.
    type Datagram: DatagramChannel;
    /// Opens a TCP byte stream to `host:port`.
    async fn open_tcp(&self, host: &str, port: u16) -> io::Result<Self::Stream>;
    /// Opens a UDP datagram channel to `host:port`.
    async fn open_udp(&self, host: &str, port: u16) -> io::Result<Self::Datagram>;
}

/// `host:port` as text, with brackets around an IPv6 literal (for logs and errors).
pub fn target_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl DatagramChannel for TunnelStream {
    async fn send(&self, data: &[u8]) -> io::Result<()> {
        self.send_datagram(data).await
    }

    async fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        self.recv_datagram().await
    }
}

impl Dialer for Tunnel {
    type Stream = TunnelStream;
    type Datagram = TunnelStream;

    async fn open_tcp(&self, host: &str, port: u16) -> io::Result<TunnelStream> {
        Tunnel::open_tcp(self, host, port).await.map_err(|e| {
            io::Error::other(format!("tunnel stream to {}: {e}", target_text(host, port)))
        })
    }

    async fn open_udp(&self, host: &str, port: u16) -> io::Result<TunnelStream> {
        Tunnel::open_udp(self, host, port).await.map_err(|e| {
            io::Error::other(format!(
                "tunnel datagram stream to {}: {e}",
                target_text(host, port)
            ))
        })
    }
}

/// Dials targets directly from this host with ordinary sockets (8 s timeout, like the paqet server).
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectDialer;

/// A connected UDP socket used as a [`DatagramChannel`].
#[derive(Debug)]
pub struct DirectDatagram {
    sock: UdpSocket,
}

impl DirectDatagram {
    /// The local address of the connected socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

impl DatagramChannel for DirectDatagram {
    async fn send(&self, data: &[u8]) -> io::Result<()> {
        if data.len() > MAX_UDP_DATAGRAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "datagram of {} bytes exceeds the {MAX_UDP_DATAGRAM}-byte limit",
                    data.len()
                ),
            ));
        }
        self.sock.send(data).await.map(|_| ())
    }

    async fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = [0u8; MAX_UDP_DATAGRAM + 1];
        loop {
            match self.sock.recv(&mut buf).await {
                Ok(n) if n <= MAX_UDP_DATAGRAM => return Ok(Some(buf[..n].to_vec())),
                Ok(n) => tracing::debug!(n, "direct udp: datagram over 4096 bytes dropped"),
                // An ICMP port unreachable from an earlier send: not fatal for a connected UDP socket.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
    }
}

async fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    let target = target_text(host, port);
    let lookup = tokio::time::timeout(DIAL_TIMEOUT, lookup_host((host, port)))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("resolving {target}: timed out"),
            )
        })?;
    lookup
        .map_err(|e| io::Error::new(e.kind(), format!("resolving {target}: {e}")))?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("resolving {target}: no address"),
            )
        })
}

impl Dialer for DirectDialer {
    type Stream = TcpStream;
    type Datagram = DirectDatagram;

    async fn open_tcp(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let addr = resolve(host, port).await?;
        let target = target_text(host, port);
        let s = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {target}: timed out"),
                )
            })?
            .map_err(|e| io::Error::new(e.kind(), format!("connecting to {target}: {e}")))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    async fn open_udp(&self, host: &str, port: u16) -> io::Result<DirectDatagram> {
        let addr = resolve(host, port).await?;
        let target = target_text(host, port);
        let bind: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([0u8; 4], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let sock = UdpSocket::bind(bind)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("udp socket for {target}: {e}")))?;
        sock.connect(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("udp connect to {target}: {e}")))?;
        Ok(DirectDatagram { sock })
    }
}

/// Copies bytes both ways between `a` and `b` until either direction ends (EOF or error), then shuts both
/// down (paqet has no half-close). Returns the byte counts `(a→b, b→a)` of the directions that finished.
pub async fn relay<A, B>(a: A, b: B) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut counts = (0, 0);
    tokio::select! {
        r = crate::util::lazycopy::copy_lazy(&mut ar, &mut bw) => {
            if let Ok(n) = r { counts.0 = n; }
        }
        r = crate::util::lazycopy::copy_lazy(&mut br, &mut aw) => {
            if let Ok(n) = r { counts.1 = n; }
        }
    }
    let _ = aw.shutdown().await;
    let _ = bw.shutdown().await;
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_text_brackets_ipv6_only() {
        assert_eq!(target_text("example.com", 443), "example.com:443");
        assert_eq!(target_text("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(target_text("2001:db8::1", 53), "[2001:db8::1]:53");
    }

    #[test]
    fn direct_udp_round_trip_and_size_limit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = echo.local_addr().unwrap().port();
            let ch = DirectDialer.open_udp("127.0.0.1", port).await.unwrap();
            ch.send(b"ping").await.unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = echo.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"ping");
            echo.send_to(b"pong", from).await.unwrap();
            assert_eq!(ch.recv().await.unwrap().as_deref(), Some(&b"pong"[..]));
            let err = ch.send(&[0u8; MAX_UDP_DATAGRAM + 1]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        });
    }
}
