//! TCP and UDP port forwards (spec §4, upstream `internal/forward`).
//!
//! - TCP: every accepted connection gets one PTCP stream to the fixed target; bytes are copied both ways
//!   until either side ends, then both are closed.
//! - UDP: per source address one PUDP stream with a 64-datagram queue (new datagrams are dropped while it
//!   is full); replies go back to that source; the stream is closed after `idle` without traffic.
//!
//! The same two loops serve the server's end of a reverse forward (`worker::reverse`): there the stream
//! for a connection or source is opened by the server towards the client ([`StreamOpener`]).
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::worker::{copy_until_either_ends, Tunnel, TunnelStream, MAX_UDP_DATAGRAM};

/// Opens the tunnel stream for one TCP connection or one UDP source; the error is logged.
pub type StreamOpener = Rc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<TunnelStream, String>>>>>;

fn tunnel_opener(tunnel: Tunnel, host: String, port: u16, udp: bool) -> StreamOpener {
    let host = Rc::new(host);
    Rc::new(move || {
        let tunnel = tunnel.clone();
        let host = host.clone();
        Box::pin(async move {
            let r = if udp {
                tunnel.open_udp(&host, port).await
            } else {
                tunnel.open_tcp(&host, port).await
            };
            r.map_err(|e| e.to_string())
        })
    })
}

/// Datagrams queued per UDP source before new ones are dropped (upstream: 64).
pub const UDP_QUEUE: usize = 64;
/// Default idle time after which a UDP source's stream is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// A bound TCP forward.
pub struct TcpForward {
    listener: TcpListener,
    host: String,
    port: u16,
}

impl TcpForward {
    /// Binds `listen`; connections will be carried to `host:port` (resolved on the server).
    pub async fn bind(listen: SocketAddr, host: String, port: u16) -> std::io::Result<Self> {
        let listener = super::bind_tcp(listen, false)
            .map_err(|e| std::io::Error::new(e.kind(), format!("tcp forward: {e}")))?;
        Ok(Self::new(listener, host, port))
    }

    /// A forward on an already bound `listener` (e.g. one of several workers' `SO_REUSEPORT` listeners).
    pub fn new(listener: TcpListener, host: String, port: u16) -> Self {
        TcpForward {
            listener,
            host,
            port,
        }
    }

    /// The bound local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self, tunnel: Tunnel) {
        let local = self.listener.local_addr().ok();
        info!(listen = ?local, target = %format!("{}:{}", self.host, self.port), "tcp forward ready");
        let open = tunnel_opener(tunnel, self.host.clone(), self.port, false);
        self.run_with("tcp forward", open).await
    }

    /// Accepts connections until the task is dropped, each carried on a stream from `open`.
    pub async fn run_with(self, what: &'static str, open: StreamOpener) {
        super::accept_loop(&self.listener, what, |conn, from| {
            let open = open.clone();
            async move {
                match open().await {
                    Ok(stream) => {
                        debug!(%from, sid = stream.sid(), "{what}: stream opened");
                        copy_until_either_ends(stream, conn).await;
                    }
                    Err(e) => warn!(%from, error = %e, "{what}: cannot open a tunnel stream"),
                }
            }
        })
        .await
    }
}

/// A bound UDP forward.
pub struct UdpForward {
    sock: Rc<UdpSocket>,
    host: String,
    port: u16,
    idle: Duration,
}

struct Peer {
    tx: mpsc::Sender<Vec<u8>>,
}

impl UdpForward {
    /// Binds `listen`; datagrams will be carried to `host:port` (resolved on the server).
    pub async fn bind(listen: SocketAddr, host: String, port: u16) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("udp forward: binding {listen}: {e}"))
        })?;
        Ok(UdpForward {
            sock: Rc::new(sock),
            host,
            port,
            idle: UDP_IDLE,
        })
    }

    /// Changes the idle expiry (default [`UDP_IDLE`]).
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The bound local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Serves datagrams until the task is dropped.
    pub async fn run(self, tunnel: Tunnel) {
        info!(listen = ?self.sock.local_addr().ok(), target = %format!("{}:{}", self.host, self.port), "udp forward ready");
        let open = tunnel_opener(tunnel, self.host.clone(), self.port, true);
        self.run_with("udp forward", open).await
    }

    /// A forward on an already bound socket (the host/port are only shown in logs).
    pub fn from_socket(sock: UdpSocket, host: String, port: u16) -> Self {
        UdpForward {
            sock: Rc::new(sock),
            host,
            port,
            idle: UDP_IDLE,
        }
    }

    /// Serves datagrams until the task is dropped, each source on a stream from `open`.
    pub async fn run_with(self, what: &'static str, open: StreamOpener) {
        let peers: Rc<std::cell::RefCell<HashMap<SocketAddr, Peer>>> = Rc::default();
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = match self.sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "{what}: receive failed");
                    continue;
                }
            };
            if n > MAX_UDP_DATAGRAM {
                debug!(%from, n, "{what}: datagram over 4096 bytes dropped");
                continue;
            }
            let existing = peers.borrow().get(&from).map(|p| p.tx.clone());
            let tx = match existing {
                Some(tx) => tx,
                None => {
                    let (tx, rx) = mpsc::channel(UDP_QUEUE);
                    peers.borrow_mut().insert(from, Peer { tx: tx.clone() });
                    let ctx = UdpPeerTask {
                        open: open.clone(),
                        what,
                        sock: self.sock.clone(),
                        from,
                        idle: self.idle,
                    };
                    let peers = peers.clone();
                    tokio::task::spawn_local(async move {
                        ctx.run(rx).await;
                        peers.borrow_mut().remove(&from);
                    });
                    tx
                }
            };
            if tx.try_send(buf[..n].to_vec()).is_err() {
                debug!(%from, "{what}: queue full, datagram dropped");
            }
        }
    }
}

struct UdpPeerTask {
    open: StreamOpener,
    what: &'static str,
    sock: Rc<UdpSocket>,
    from: SocketAddr,
    idle: Duration,
}

impl UdpPeerTask {
    async fn run(self, mut rx: mpsc::Receiver<Vec<u8>>) {
        let what = self.what;
        let stream = match (self.open)().await {
            Ok(s) => s,
            Err(e) => {
                warn!(from = %self.from, error = %e, "{what}: cannot open a tunnel stream");
                return;
            }
        };
        debug!(from = %self.from, sid = stream.sid(), "{what}: stream opened");
        let last = Cell::new(Instant::now());
        loop {
            let expiry = last.get() + self.idle;
            tokio::select! {
                d = rx.recv() => match d {
                    Some(d) => {
                        last.set(Instant::now());
                        if let Err(e) = stream.send_datagram(&d).await {
                            debug!(from = %self.from, error = %e, "{what}: stream write failed");
                            return;
                        }
                    }
                    None => return,
                },
                r = stream.recv_datagram() => match r {
                    Ok(Some(d)) => {
                        last.set(Instant::now());
                        let _ = self.sock.send_to(&d, self.from).await;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        debug!(from = %self.from, error = %e, "{what}: stream read failed");
                        return;
                    }
                },
                _ = tokio::time::sleep_until(expiry) => {
                    debug!(from = %self.from, "{what}: idle, stream closed");
                    return;
                }
            }
        }
    }
}
