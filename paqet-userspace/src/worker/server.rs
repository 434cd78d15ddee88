//! Server role: one link on the tunnel port, sessions created per client source, and a handler task per
//! stream the client opens (spec §3.7-3.8): read the paqet header within `header_timeout`, then
//! PING → PONG; PTCPF → store the client's flag list; PTCP → dial TCP (8 s) and copy both ways until either
//! side ends; PUDP → connected UDP socket, one datagram per smux frame both ways.
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{lookup_host, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::core::{spawn_link_rx, unix_now, Shared};
use super::stream::TunnelStream;
use super::{IoFactory, DIAL_TIMEOUT, MAX_UDP_DATAGRAM};
use crate::config::targets::{count_target_refusal, Refusal, TargetPolicy};
use crate::io::PacketIo;
use crate::proto::session::Role;
use crate::wire::envelope::EnvelopeBuilder;
use crate::wire::header::{Header, HeaderError};

/// Why a stream handler stopped early (logged at debug: these are the peer's or the target's doing).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("failed to read protocol message: {0}")]
    Read(std::io::Error),
    #[error("bad protocol message: {0}")]
    Header(#[from] HeaderError),
    #[error("no protocol message within {0:?}")]
    HeaderTimeout(Duration),
    #[error("resolving {target}: {source}")]
    Resolve {
        target: String,
        source: std::io::Error,
    },
    #[error("dialling {target}: {source}")]
    Dial {
        target: String,
        source: std::io::Error,
    },
    #[error("dialling {target}: timed out after {DIAL_TIMEOUT:?}")]
    DialTimeout { target: String },
    /// The target is refused by `server.allow` / `server.deny`.
    #[error("target {target} refused: {reason}")]
    TargetDenied { target: String, reason: Refusal },
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the server's link on its tunnel port(s) and starts its RX and accept tasks.
pub(crate) fn start(shared: &Shared, mut factory: IoFactory) -> std::io::Result<()> {
    let port = shared.borrow().cfg.local_port();
    let io = factory(port)?;
    let (link_id, fd, retire) = start_on(shared, io, false)?;
    spawn_link_rx(shared.clone(), link_id, fd, retire);
    Ok(())
}

/// XDP mode: adds `io` (the worker's queue socket) as a shared link on the tunnel port and starts the
/// accept task; the caller runs the link's RX task. Returns the link id and its readiness fd.
pub(crate) fn start_shared(
    shared: &Shared,
    io: Box<dyn PacketIo>,
) -> std::io::Result<(u64, Option<RawFd>)> {
    let (link_id, fd, _retire) = start_on(shared, io, true)?;
    Ok((link_id, fd))
}

/// Adds the server link and the accept channel/task; returns what the RX task needs.
fn start_on(
    shared: &Shared,
    io: Box<dyn PacketIo>,
    shared_link: bool,
) -> std::io::Result<(u64, Option<RawFd>, Rc<Notify>)> {
    let (link_id, fd, retire, accept_rx) = {
        let mut c = shared.borrow_mut();
        let cfg = c.cfg.clone();
        if cfg.role != Role::Server {
            return Err(std::io::Error::other("not a server worker"));
        }
        let port = cfg.local_port();
        let t = unix_now().as_millis() as u32;
        let mk = |f: Option<&super::FamilyConfig>| {
            f.and_then(|f| {
                // The destination is set per frame; start with an unspecified peer of the same family.
                let unspec: SocketAddr = if f.addr.is_ipv4() {
                    SocketAddr::from(([0u8; 4], 0))
                } else {
                    SocketAddr::from(([0u16; 8], 0))
                };
                EnvelopeBuilder::new(cfg.local_mac, f.router_mac, f.addr, unspec, t).ok()
            })
        };
        let env4 = mk(cfg.ipv4.as_ref());
        let env6 = mk(cfg.ipv6.as_ref());
        let (link_id, fd, retire) = if shared_link {
            c.add_shared_link(io, port, env4, env6)
        } else {
            c.add_link(io, port, env4, env6)
        };
        let (tx, rx) = mpsc::unbounded_channel();
        c.set_accept_channel(tx);
        info!(port, "server listening");
        (link_id, fd, retire, rx)
    };
    tokio::task::spawn_local(accept_loop(shared.clone(), accept_rx));
    Ok((link_id, fd, retire))
}

async fn accept_loop(shared: Shared, mut rx: mpsc::UnboundedReceiver<(u64, u32)>) {
    while let Some((id, sid)) = rx.recv().await {
        let stream = TunnelStream::attach(shared.clone(), id, sid);
        let sh = shared.clone();
        tokio::task::spawn_local(async move {
            let peer = stream.peer();
            if let Err(e) = handle_stream(&sh, stream).await {
                debug!(peer = ?peer, sid, error = %e, "stream ended");
            }
        });
    }
}

/// Reads the paqet header: 5 bytes, then exactly the body (so nothing after it is consumed).
pub(super) async fn read_header(s: &mut TunnelStream) -> Result<Header, StreamError> {
    let mut buf = vec![0u8; 5];
    s.read_exact(&mut buf).await.map_err(StreamError::Read)?;
    if let Some((h, _)) = Header::parse(&buf)? {
        return Ok(h);
    }
    let body = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    buf.resize(5 + body, 0);
    s.read_exact(&mut buf[5..])
        .await
        .map_err(StreamError::Read)?;
    match Header::parse(&buf)? {
        Some((h, _)) => Ok(h),
        None => Err(StreamError::Read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("incomplete header of {} bytes", buf.len()),
        ))),
    }
}

async fn handle_stream(shared: &Shared, mut s: TunnelStream) -> Result<(), StreamError> {
    let timeout = shared.borrow().cfg.header_timeout;
    let header = match tokio::time::timeout(timeout, read_header(&mut s)).await {
        Ok(r) => r?,
        Err(_) => {
            shared.borrow_mut().header_timed_out(s.session_id());
            return Err(StreamError::HeaderTimeout(timeout));
        }
    };
    match header {
        Header::Ping => {
            let mut pong = Vec::with_capacity(5);
            Header::Pong.emit(&mut pong);
            s.write_all(&pong).await?;
            Ok(())
        }
        Header::TcpFlags(list) => {
            if let Some(peer) = s.peer() {
                shared.borrow_mut().set_peer_flags(peer, &list);
            }
            Ok(())
        }
        Header::Tcp { host, port } => {
            let Some(_permit) = DataStreamPermit::take(shared, &s) else {
                return Ok(());
            };
            let targets = shared.borrow().cfg.targets.clone();
            let addrs = resolve_allowed(&targets, &host, port, "tcp").await?;
            relay_tcp(s, &host, port, &addrs).await
        }
        Header::Udp { host, port } => {
            let Some(_permit) = DataStreamPermit::take(shared, &s) else {
                return Ok(());
            };
            let targets = shared.borrow().cfg.targets.clone();
            let addrs = resolve_allowed(&targets, &host, port, "udp").await?;
            relay_udp(s, &host, port, addrs[0]).await
        }
        Header::ReverseDeclare(entries) => {
            super::reverse::serve_declaration(shared, s, entries).await
        }
        Header::Pong | Header::ReverseAnswer(_) | Header::ReverseConnect { .. } => {
            debug!(kind = header.kind(), "unexpected message from a client");
            Ok(())
        }
    }
}

/// A proxied stream's place under the stream limits, given back when the relay ends.
struct DataStreamPermit {
    shared: Shared,
    session: u64,
}

impl DataStreamPermit {
    /// `None` (the stream is then closed by dropping it) when a stream limit is reached.
    fn take(shared: &Shared, s: &TunnelStream) -> Option<Self> {
        let session = s.session_id();
        shared
            .borrow_mut()
            .admit_data_stream(session)
            .then(|| DataStreamPermit {
                shared: shared.clone(),
                session,
            })
    }
}

impl Drop for DataStreamPermit {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.try_borrow_mut() {
            c.end_data_stream(self.session);
        }
    }
}

fn target_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Resolves a stream's target and keeps the addresses `server.allow` / `server.deny` permit (checked after
/// DNS, so a name cannot bypass them). None left → the stream is refused: a rate-limited log line and
/// `paqet_streams_refused_total{reason="target_denied"}`. Never empty on success.
async fn resolve_allowed(
    policy: &TargetPolicy,
    host: &str,
    port: u16,
    proto: &str,
) -> Result<Vec<SocketAddr>, StreamError> {
    let target = target_text(host, port);
    let resolved: Vec<SocketAddr> =
        match tokio::time::timeout(DIAL_TIMEOUT, lookup_host((host, port))).await {
            Ok(Ok(it)) => it.collect(),
            Ok(Err(source)) => return Err(StreamError::Resolve { target, source }),
            Err(_) => return Err(StreamError::DialTimeout { target }),
        };
    let Some(first) = resolved.first().copied() else {
        return Err(StreamError::Resolve {
            target,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        });
    };
    let mut refusal = None;
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|a| match policy.check(*a) {
            Ok(()) => true,
            Err(r) => {
                refusal.get_or_insert((*a, r));
                false
            }
        })
        .collect();
    if !allowed.is_empty() {
        return Ok(allowed);
    }
    let (addr, reason) = refusal.unwrap_or((first, Refusal::NotAllowed));
    count_target_refusal();
    if REFUSAL_LOG.lock().map(|mut l| l.allow()).unwrap_or(false) {
        warn!(%target, %addr, proto, %reason, "stream refused: target not permitted by server.allow/server.deny (further refusals logged at most once per second)");
    }
    Err(StreamError::TargetDenied { target, reason })
}

/// At most one refusal log line per second (a client probing many targets must not flood the log).
static REFUSAL_LOG: std::sync::Mutex<LogLimit> = std::sync::Mutex::new(LogLimit { last: None });

struct LogLimit {
    last: Option<std::time::Instant>,
}

impl LogLimit {
    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

pub(super) async fn relay_tcp(
    s: TunnelStream,
    host: &str,
    port: u16,
    addrs: &[SocketAddr],
) -> Result<(), StreamError> {
    let target = target_text(host, port);
    let tcp = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addrs)).await {
        Ok(Ok(t)) => t,
        Ok(Err(source)) => return Err(StreamError::Dial { target, source }),
        Err(_) => return Err(StreamError::DialTimeout { target }),
    };
    let _ = tcp.set_nodelay(true);
    debug!(%target, "TCP target connected");
    copy_until_either_ends(s, tcp).await;
    Ok(())
}

/// Copies both ways until either direction ends (EOF or error), then closes both (upstream semantics:
/// no half-close).
pub async fn copy_until_either_ends(s: TunnelStream, tcp: TcpStream) {
    let (mut tr, mut tw) = tcp.into_split();
    let (mut sr, mut sw) = tokio::io::split(s);
    tokio::select! {
        _ = crate::util::lazycopy::copy_lazy(&mut sr, &mut tw) => {}
        _ = crate::util::lazycopy::copy_lazy(&mut tr, &mut sw) => {}
    }
    let _ = tw.shutdown().await;
}

pub(super) async fn relay_udp(
    s: TunnelStream,
    host: &str,
    port: u16,
    addr: SocketAddr,
) -> Result<(), StreamError> {
    let target = target_text(host, port);
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|source| StreamError::Dial {
            target: target.clone(),
            source,
        })?;
    sock.connect(addr)
        .await
        .map_err(|source| StreamError::Dial {
            target: target.clone(),
            source,
        })?;
    debug!(%target, "UDP target connected");
    let mut buf = vec![0u8; MAX_UDP_DATAGRAM + 1];
    loop {
        tokio::select! {
            d = s.recv_datagram() => match d? {
                Some(d) if d.len() <= MAX_UDP_DATAGRAM => { let _ = sock.send(&d).await; }
                Some(_) => {}
                None => return Ok(()),
            },
            r = sock.recv(&mut buf) => match r {
                Ok(n) if n <= MAX_UDP_DATAGRAM => s.send_datagram(&buf[..n]).await?,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
}
