//! SOCKS5 server (RFC 1928, RFC 1929) with upstream paqet's behaviour (spec §4).
//!
//! - Methods: only the configured one is offered: 0x00 (no auth) or 0x02 (username/password, reply `01 00`
//!   ok / `01 01` fail); otherwise `05 FF`. Negotiation and request share one 8 s deadline.
//! - CONNECT: the stream is opened through the [`Dialer`] (on a tunnel: header written, server not yet
//!   dialled), then `05 00 00 <local address of the SOCKS connection>`; failure `05 01 00 01 0.0.0.0:0`.
//! - UDP ASSOCIATE: a UDP socket on the control connection's local IP, port 0. Accepted source: the
//!   request's address and port, or (domain / unspecified address / port 0) the control connection's peer
//!   IP with the port learned from the first datagram. FRAG≠0 and payloads over 4096 bytes are dropped. One
//!   datagram channel per (client address, target), closed after 60 s idle; replies are wrapped with the
//!   original request's ATYP/ADDR/PORT. The association ends when the control connection closes.
//! - BIND and unknown commands: `05 07 00 01 0.0.0.0:0`; unknown ATYP: `05 08 00 01 0.0.0.0:0`.
//!
//! Hosts reach the dialer as literal strings: domains as sent, IPs as Go's `net.IP.String()` prints them
//! (IPv6 without brackets, IPv4-mapped IPv6 as dotted IPv4).
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::dial::{relay, target_text, DatagramChannel, Dialer};
use crate::worker::MAX_UDP_DATAGRAM;

/// Deadline for method negotiation plus the request (upstream: 8 s).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(8);
/// Idle time after which a UDP ASSOCIATE datagram channel is closed (upstream: 60 s).
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// Live UDP ASSOCIATE datagram channels of this process (their reply tasks), for
/// `paqet_socks5_udp_channels`.
static UDP_CHANNELS: AtomicU64 = AtomicU64::new(0);

/// Live UDP ASSOCIATE datagram channels of this process, each with its reply task and idle timer.
pub fn udp_channels() -> u64 {
    UDP_CHANNELS.load(Ordering::Relaxed)
}

/// Counts one live channel in [`UDP_CHANNELS`] while it exists (also when its task is aborted).
struct LiveChannel;

impl LiveChannel {
    fn new() -> Self {
        UDP_CHANNELS.fetch_add(1, Ordering::Relaxed);
        LiveChannel
    }
}

impl Drop for LiveChannel {
    fn drop(&mut self) {
        UDP_CHANNELS.fetch_sub(1, Ordering::Relaxed);
    }
}

const VER: u8 = 0x05;
const AUTH_VER: u8 = 0x01;
/// Method: no authentication.
pub const METHOD_NONE: u8 = 0x00;
/// Method: username/password (RFC 1929).
pub const METHOD_USERPASS: u8 = 0x02;
/// Method reply: no acceptable method.
pub const METHOD_NOT_ACCEPTABLE: u8 = 0xFF;
/// Command CONNECT.
pub const CMD_CONNECT: u8 = 0x01;
/// Command BIND (not supported, as upstream).
pub const CMD_BIND: u8 = 0x02;
/// Command UDP ASSOCIATE.
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;
/// Reply: succeeded.
pub const REP_SUCCESS: u8 = 0x00;
/// Reply: general failure.
pub const REP_FAILURE: u8 = 0x01;
/// Reply: command not supported.
pub const REP_CMD_UNSUPPORTED: u8 = 0x07;
/// Reply: address type not supported.
pub const REP_ATYP_UNSUPPORTED: u8 = 0x08;

/// Largest SOCKS5 UDP header (RSV FRAG ATYP, domain length, 255-byte domain, port).
const MAX_UDP_HEADER: usize = 4 + 1 + 255 + 2;

/// Configuration of one SOCKS5 listener. Authentication is required when either field is non-empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Socks5Config {
    pub username: String,
    pub password: String,
}

impl Socks5Config {
    /// The only method this listener offers.
    pub fn method(&self) -> u8 {
        if self.username.is_empty() && self.password.is_empty() {
            METHOD_NONE
        } else {
            METHOD_USERPASS
        }
    }
}

/// Why a SOCKS5 connection ended early.
#[derive(Debug, Error)]
pub enum Socks5Error {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("negotiation and request not done within {0:?}")]
    Timeout(Duration),
    #[error("unsupported SOCKS version {0:#04x}")]
    BadVersion(u8),
    #[error("no acceptable method: client offered {offered:02x?}, server requires {wanted:#04x}")]
    NoAcceptableMethod { offered: Vec<u8>, wanted: u8 },
    #[error("unsupported username/password sub-negotiation version {0:#04x}")]
    BadAuthVersion(u8),
    #[error("authentication failed for user {0:?}")]
    AuthFailed(String),
    #[error("unsupported address type {0:#04x}")]
    BadAddressType(u8),
    #[error("domain name is not UTF-8: {0:02x?}")]
    DomainNotUtf8(Vec<u8>),
    #[error("unsupported command {0:#04x}")]
    UnsupportedCommand(u8),
    #[error("opening {target}: {source}")]
    Dial { target: String, source: io::Error },
    #[error("UDP datagram of {0} bytes is shorter than its SOCKS5 header")]
    DatagramTruncated(usize),
    #[error("UDP datagram fragment {0} (fragmentation is not supported)")]
    Fragmented(u8),
}

/// A request's destination host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Domain(String),
}

impl Host {
    /// The literal host string for the paqet header (Go `net.IP.String()` for addresses).
    pub fn to_header_string(&self) -> String {
        match self {
            Host::Domain(d) => d.clone(),
            Host::Ip(IpAddr::V4(v4)) => v4.to_string(),
            Host::Ip(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            },
        }
    }
}

/// A parsed SOCKS5 request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub cmd: u8,
    pub host: Host,
    pub port: u16,
}

/// Picks the method: the configured one if the client offers it, else [`METHOD_NOT_ACCEPTABLE`].
pub fn choose_method(offered: &[u8], wanted: u8) -> u8 {
    if offered.contains(&wanted) {
        wanted
    } else {
        METHOD_NOT_ACCEPTABLE
    }
}

/// Appends `ATYP ADDR PORT` for `addr` (IPv4-mapped IPv6 encoded as IPv4, like Go's `To4()`).
pub fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// A reply `05 rep 00 ATYP ADDR PORT`; `bind = None` gives `0.0.0.0:0`.
pub fn reply(rep: u8, bind: Option<SocketAddr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[VER, rep, 0x00]);
    put_addr(
        &mut out,
        bind.unwrap_or_else(|| SocketAddr::from(([0u8; 4], 0))),
    );
    out
}

async fn read_u8<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).await?;
    Ok(b[0])
}

/// Reads `ATYP ADDR PORT`. An unknown ATYP is [`Socks5Error::BadAddressType`] (nothing more is read).
pub async fn read_addr<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Host, u16), Socks5Error> {
    let atyp = read_u8(r).await?;
    let host = match atyp {
        ATYP_IPV4 => {
            let mut a = [0u8; 4];
            r.read_exact(&mut a).await?;
            Host::Ip(IpAddr::V4(Ipv4Addr::from(a)))
        }
        ATYP_IPV6 => {
            let mut a = [0u8; 16];
            r.read_exact(&mut a).await?;
            Host::Ip(IpAddr::V6(Ipv6Addr::from(a)))
        }
        ATYP_DOMAIN => {
            let len = read_u8(r).await? as usize;
            let mut d = vec![0u8; len];
            r.read_exact(&mut d).await?;
            match String::from_utf8(d) {
                Ok(s) => Host::Domain(s),
                Err(e) => {
                    // Read the port so the error reply is not sent in the middle of the request.
                    let mut p = [0u8; 2];
                    r.read_exact(&mut p).await?;
                    return Err(Socks5Error::DomainNotUtf8(e.into_bytes()));
                }
            }
        }
        other => return Err(Socks5Error::BadAddressType(other)),
    };
    let mut p = [0u8; 2];
    r.read_exact(&mut p).await?;
    Ok((host, u16::from_be_bytes(p)))
}

/// Method negotiation (and RFC 1929 authentication when configured); writes the replies.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &Socks5Config,
) -> Result<(), Socks5Error> {
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await?;
    if hdr[0] != VER {
        return Err(Socks5Error::BadVersion(hdr[0]));
    }
    let mut offered = vec![0u8; hdr[1] as usize];
    s.read_exact(&mut offered).await?;
    let wanted = cfg.method();
    let chosen = choose_method(&offered, wanted);
    s.write_all(&[VER, chosen]).await?;
    if chosen == METHOD_NOT_ACCEPTABLE {
        return Err(Socks5Error::NoAcceptableMethod { offered, wanted });
    }
    if chosen == METHOD_USERPASS {
        let ver = read_u8(s).await?;
        if ver != AUTH_VER {
            s.write_all(&[AUTH_VER, 0x01]).await?;
            return Err(Socks5Error::BadAuthVersion(ver));
        }
        let ulen = read_u8(s).await? as usize;
        let mut user = vec![0u8; ulen];
        s.read_exact(&mut user).await?;
        let plen = read_u8(s).await? as usize;
        let mut pass = vec![0u8; plen];
        s.read_exact(&mut pass).await?;
        let ok = user == cfg.username.as_bytes() && pass == cfg.password.as_bytes();
        s.write_all(&[AUTH_VER, if ok { 0x00 } else { 0x01 }])
            .await?;
        if !ok {
            return Err(Socks5Error::AuthFailed(
                String::from_utf8_lossy(&user).into_owned(),
            ));
        }
    }
    Ok(())
}

/// Reads the request `05 CMD RSV ATYP ADDR PORT`. Error replies (bad address type, bad domain) are
/// written here; the command itself is checked by the caller.
pub async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<Request, Socks5Error> {
    let mut hdr = [0u8; 3];
    s.read_exact(&mut hdr).await?;
    if hdr[0] != VER {
        return Err(Socks5Error::BadVersion(hdr[0]));
    }
    match read_addr(s).await {
        Ok((host, port)) => Ok(Request {
            cmd: hdr[1],
            host,
            port,
        }),
        Err(e @ Socks5Error::BadAddressType(_)) => {
            s.write_all(&reply(REP_ATYP_UNSUPPORTED, None)).await?;
            Err(e)
        }
        Err(e @ Socks5Error::DomainNotUtf8(_)) => {
            s.write_all(&reply(REP_FAILURE, None)).await?;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// A parsed SOCKS5 UDP request header (`RSV RSV FRAG ATYP ADDR PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpHeader {
    pub host: Host,
    pub port: u16,
    /// Header length in bytes: the payload starts here.
    pub len: usize,
}

/// Parses the header of a client UDP datagram. FRAG≠0 is [`Socks5Error::Fragmented`].
pub fn parse_udp_header(p: &[u8]) -> Result<UdpHeader, Socks5Error> {
    let short = || Socks5Error::DatagramTruncated(p.len());
    if p.len() < 4 {
        return Err(short());
    }
    if p[2] != 0 {
        return Err(Socks5Error::Fragmented(p[2]));
    }
    let (host, at) = match p[3] {
        ATYP_IPV4 => {
            let a: [u8; 4] = p
                .get(4..8)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?;
            (Host::Ip(IpAddr::V4(Ipv4Addr::from(a))), 8)
        }
        ATYP_IPV6 => {
            let a: [u8; 16] = p
                .get(4..20)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?;
            (Host::Ip(IpAddr::V6(Ipv6Addr::from(a))), 20)
        }
        ATYP_DOMAIN => {
            let n = *p.get(4).ok_or_else(short)? as usize;
            let d = p.get(5..5 + n).ok_or_else(short)?;
            let s = std::str::from_utf8(d).map_err(|_| Socks5Error::DomainNotUtf8(d.to_vec()))?;
            (Host::Domain(s.to_owned()), 5 + n)
        }
        other => return Err(Socks5Error::BadAddressType(other)),
    };
    let port = p.get(at..at + 2).ok_or_else(short)?;
    Ok(UdpHeader {
        host,
        port: u16::from_be_bytes([port[0], port[1]]),
        len: at + 2,
    })
}

/// Accepts connections until the task is dropped; each one is served on its own local task.
pub async fn serve<D: Dialer + 'static>(listener: TcpListener, cfg: Socks5Config, dialer: Rc<D>) {
    let cfg = Rc::new(cfg);
    info!(listen = ?listener.local_addr().ok(), auth = cfg.method() == METHOD_USERPASS, "socks5 ready");
    super::accept_loop(&listener, "socks5", |conn, from| {
        let cfg = cfg.clone();
        let dialer = dialer.clone();
        async move {
            if let Err(e) = handle_conn(conn, &cfg, dialer).await {
                debug!(%from, error = %e, "socks5 connection ended");
            }
        }
    })
    .await
}

/// Serves one SOCKS5 connection: negotiation, request, then CONNECT relay or UDP association.
pub async fn handle_conn<D: Dialer + 'static>(
    mut conn: TcpStream,
    cfg: &Socks5Config,
    dialer: Rc<D>,
) -> Result<(), Socks5Error> {
    let req = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        negotiate(&mut conn, cfg).await?;
        read_request(&mut conn).await
    })
    .await
    .map_err(|_| Socks5Error::Timeout(HANDSHAKE_TIMEOUT))??;
    match req.cmd {
        CMD_CONNECT => connect(conn, req, &*dialer).await,
        CMD_UDP_ASSOCIATE => associate(conn, req, dialer).await,
        other => {
            conn.write_all(&reply(REP_CMD_UNSUPPORTED, None)).await?;
            Err(Socks5Error::UnsupportedCommand(other))
        }
    }
}

async fn connect<D: Dialer>(
    mut conn: TcpStream,
    req: Request,
    dialer: &D,
) -> Result<(), Socks5Error> {
    let host = req.host.to_header_string();
    let target = target_text(&host, req.port);
    let peer = conn.peer_addr().ok();
    let stream = match dialer.open_tcp(&host, req.port).await {
        Ok(s) => s,
        Err(source) => {
            let _ = conn.write_all(&reply(REP_FAILURE, None)).await;
            return Err(Socks5Error::Dial { target, source });
        }
    };
    conn.write_all(&reply(REP_SUCCESS, Some(conn.local_addr()?)))
        .await?;
    info!(from = ?peer, %target, "socks5: accepted TCP connection");
    let (up, down) = relay(conn, stream).await;
    debug!(from = ?peer, %target, up, down, "socks5: TCP connection closed");
    Ok(())
}

/// Key of a UDP association's channel: (client address, target host, target port).
type UdpKey = (SocketAddr, String, u16);

struct UdpEntry<C> {
    ch: Rc<C>,
    last: Rc<Cell<Instant>>,
    id: u64,
    task: JoinHandle<()>,
}

type Pool<C> = Rc<RefCell<HashMap<UdpKey, UdpEntry<C>>>>;

/// Aborts every reply task of an association when it ends.
struct PoolGuard<C>(Pool<C>);

impl<C> Drop for PoolGuard<C> {
    fn drop(&mut self) {
        let entries: Vec<_> = self.0.borrow_mut().drain().map(|(_, e)| e).collect();
        for e in entries {
            e.task.abort();
        }
    }
}

/// The source rule of an association: the IP must match; port 0 means "learn from the first datagram".
struct Expected {
    ip: IpAddr,
    port: u16,
}

impl Expected {
    fn accept(&mut self, from: SocketAddr) -> bool {
        if from.ip().to_canonical() != self.ip {
            return false;
        }
        if self.port == 0 {
            self.port = from.port();
        }
        from.port() == self.port
    }
}

async fn associate<D: Dialer + 'static>(
    mut conn: TcpStream,
    req: Request,
    dialer: Rc<D>,
) -> Result<(), Socks5Error> {
    let local = conn.local_addr()?;
    let sock = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => Rc::new(s),
        Err(e) => {
            let _ = conn.write_all(&reply(REP_FAILURE, None)).await;
            return Err(e.into());
        }
    };
    let relay_addr = sock.local_addr()?;
    conn.write_all(&reply(REP_SUCCESS, Some(relay_addr)))
        .await?;
    let peer = conn.peer_addr()?;
    let mut expected = match req.host {
        Host::Ip(ip) if !ip.is_unspecified() => Expected {
            ip: ip.to_canonical(),
            port: req.port,
        },
        _ => Expected {
            ip: peer.ip().to_canonical(),
            port: 0,
        },
    };
    debug!(from = %peer, relay = %relay_addr, expect = %expected.ip, "socks5: UDP ASSOCIATE");

    let pool: Pool<D::Datagram> = Rc::default();
    let _guard = PoolGuard(pool.clone());
    let mut next_id = 0u64;
    let mut buf = vec![0u8; MAX_UDP_HEADER + MAX_UDP_DATAGRAM + 1];
    let mut ctrl = [0u8; 512];
    loop {
        let (n, from) = tokio::select! {
            r = conn.read(&mut ctrl) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // anything on the control connection is ignored
            },
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e.into()),
            },
        };
        if n == buf.len() {
            debug!(%from, n, "socks5 UDP: datagram too large, dropped");
            continue;
        }
        if !expected.accept(from) {
            debug!(%from, want = %expected.ip, "socks5 UDP: unexpected source, dropped");
            continue;
        }
        let hdr = match parse_udp_header(&buf[..n]) {
            Ok(h) => h,
            Err(e) => {
                debug!(%from, error = %e, "socks5 UDP: malformed datagram, dropped");
                continue;
            }
        };
        let data = &buf[hdr.len..n];
        if data.len() > MAX_UDP_DATAGRAM {
            debug!(%from, len = data.len(), "socks5 UDP: payload over 4096 bytes, dropped");
            continue;
        }
        let host = hdr.host.to_header_string();
        let key: UdpKey = (from, host, hdr.port);
        let existing = pool
            .borrow()
            .get(&key)
            .map(|e| (e.ch.clone(), e.last.clone(), e.id));
        let (ch, last, id) = match existing {
            Some(x) => x,
            None => {
                let ch = match dialer.open_udp(&key.1, key.2).await {
                    Ok(c) => Rc::new(c),
                    Err(e) => {
                        warn!(%from, target = %target_text(&key.1, key.2), error = %e,
                            "socks5 UDP: cannot open a datagram channel");
                        continue;
                    }
                };
                info!(%from, target = %target_text(&key.1, key.2), "socks5: accepted UDP flow");
                next_id += 1;
                let last = Rc::new(Cell::new(Instant::now()));
                let task = tokio::task::spawn_local(reply_task(ReplyTask {
                    ch: ch.clone(),
                    last: last.clone(),
                    sock: sock.clone(),
                    client: from,
                    header: buf[..hdr.len].to_vec(),
                    pool: pool.clone(),
                    key: key.clone(),
                    id: next_id,
                }));
                pool.borrow_mut().insert(
                    key.clone(),
                    UdpEntry {
                        ch: ch.clone(),
                        last: last.clone(),
                        id: next_id,
                        task,
                    },
                );
                (ch, last, next_id)
            }
        };
        match ch.send(data).await {
            Ok(()) => last.set(Instant::now()),
            Err(e) => {
                debug!(%from, error = %e, "socks5 UDP: send failed, channel closed");
                remove_entry(&pool, &key, id, true);
            }
        }
    }
    debug!(from = %peer, "socks5: UDP ASSOCIATE control connection closed");
    Ok(())
}

/// Removes `key` from the pool if it still holds entry `id`; `abort` stops its reply task.
fn remove_entry<C>(pool: &Pool<C>, key: &UdpKey, id: u64, abort: bool) {
    let removed = {
        let mut p = pool.borrow_mut();
        if p.get(key).is_some_and(|e| e.id == id) {
            p.remove(key)
        } else {
            None
        }
    };
    if let Some(e) = removed {
        if abort {
            e.task.abort();
        }
    }
}

struct ReplyTask<C> {
    ch: Rc<C>,
    last: Rc<Cell<Instant>>,
    sock: Rc<UdpSocket>,
    client: SocketAddr,
    /// The original request's `RSV FRAG ATYP ADDR PORT`, prefixed to every reply.
    header: Vec<u8>,
    pool: Pool<C>,
    key: UdpKey,
    id: u64,
}

/// Carries replies of one channel back to the client until the channel ends or idles out.
async fn reply_task<C: DatagramChannel>(t: ReplyTask<C>) {
    let _live = LiveChannel::new();
    let hlen = t.header.len();
    let mut out = t.header.clone();
    out[..3].fill(0); // RSV RSV FRAG, as upstream rebuilds it
    loop {
        let deadline = t.last.get() + UDP_IDLE;
        tokio::select! {
            r = t.ch.recv() => match r {
                Ok(Some(d)) => {
                    t.last.set(Instant::now());
                    if d.len() > MAX_UDP_DATAGRAM {
                        continue;
                    }
                    out.truncate(hlen);
                    out.extend_from_slice(&d);
                    if let Err(e) = t.sock.send_to(&out, t.client).await {
                        debug!(client = %t.client, error = %e, "socks5 UDP: reply send failed");
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(client = %t.client, error = %e, "socks5 UDP: channel read failed");
                    break;
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                if t.last.get() + UDP_IDLE <= Instant::now() {
                    debug!(client = %t.client, target = %target_text(&t.key.1, t.key.2), "socks5 UDP: idle, closed");
                    break;
                }
            }
        }
    }
    remove_entry(&t.pool, &t.key, t.id, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// An in-memory duplex pair: (server side, client side).
    fn pair() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        tokio::io::duplex(4096)
    }

    #[test]
    fn method_choice_offers_only_the_configured_one() {
        assert_eq!(choose_method(&[0x00, 0x02], METHOD_NONE), METHOD_NONE);
        assert_eq!(choose_method(&[0x02], METHOD_NONE), METHOD_NOT_ACCEPTABLE);
        assert_eq!(
            choose_method(&[0x00], METHOD_USERPASS),
            METHOD_NOT_ACCEPTABLE
        );
        assert_eq!(choose_method(&[], METHOD_NONE), METHOD_NOT_ACCEPTABLE);
        let cfg = Socks5Config {
            username: "u".into(),
            password: String::new(),
        };
        assert_eq!(cfg.method(), METHOD_USERPASS);
        assert_eq!(Socks5Config::default().method(), METHOD_NONE);
    }

    #[test]
    fn replies_encode_addresses_like_go() {
        assert_eq!(reply(REP_FAILURE, None), [5, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            reply(REP_SUCCESS, Some("127.0.0.1:1080".parse().unwrap())),
            [5, 0, 0, 1, 127, 0, 0, 1, 4, 56]
        );
        // IPv4-mapped IPv6 (dual-stack listener) is sent as IPv4.
        assert_eq!(
            reply(REP_SUCCESS, Some("[::ffff:10.0.0.1]:80".parse().unwrap())),
            [5, 0, 0, 1, 10, 0, 0, 1, 0, 80]
        );
        let v6 = reply(REP_SUCCESS, Some("[2001:db8::1]:53".parse().unwrap()));
        assert_eq!(v6.len(), 22);
        assert_eq!(&v6[..4], &[5, 0, 0, 4]);
        assert_eq!(&v6[20..], &[0, 53]);
    }

    #[test]
    fn host_strings_match_go_ip_string() {
        assert_eq!(
            Host::Ip("1.2.3.4".parse().unwrap()).to_header_string(),
            "1.2.3.4"
        );
        assert_eq!(
            Host::Ip("2001:db8::1".parse().unwrap()).to_header_string(),
            "2001:db8::1"
        );
        assert_eq!(
            Host::Ip("::ffff:1.2.3.4".parse().unwrap()).to_header_string(),
            "1.2.3.4"
        );
        assert_eq!(
            Host::Domain("example.com".into()).to_header_string(),
            "example.com"
        );
    }

    #[test]
    fn requests_parse_for_every_atyp() {
        rt().block_on(async {
            let cases: Vec<(Vec<u8>, Request)> = vec![
                (
                    vec![5, 1, 0, 1, 10, 0, 0, 5, 0, 80],
                    Request {
                        cmd: 1,
                        host: Host::Ip("10.0.0.5".parse().unwrap()),
                        port: 80,
                    },
                ),
                (
                    [&[5u8, 3, 0, 3, 11][..], b"example.com", &[1, 187]].concat(),
                    Request {
                        cmd: 3,
                        host: Host::Domain("example.com".into()),
                        port: 443,
                    },
                ),
                (
                    [
                        &[5u8, 1, 0, 4][..],
                        &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
                        &[0, 53],
                    ]
                    .concat(),
                    Request {
                        cmd: 1,
                        host: Host::Ip("2001:db8::1".parse().unwrap()),
                        port: 53,
                    },
                ),
            ];
            for (bytes, want) in cases {
                let (mut srv, mut cli) = pair();
                cli.write_all(&bytes).await.unwrap();
                assert_eq!(read_request(&mut srv).await.unwrap(), want);
            }
        });
    }

    #[test]
    fn bad_requests_get_error_replies() {
        rt().block_on(async {
            // Unknown ATYP → 05 08.
            let (mut srv, mut cli) = pair();
            cli.write_all(&[5, 1, 0, 9, 1, 2, 3]).await.unwrap();
            assert!(matches!(
                read_request(&mut srv).await,
                Err(Socks5Error::BadAddressType(9))
            ));
            let mut r = [0u8; 10];
            cli.read_exact(&mut r).await.unwrap();
            assert_eq!(r, [5, 8, 0, 1, 0, 0, 0, 0, 0, 0]);
            // Wrong version → error, no reply.
            let (mut srv, mut cli) = pair();
            cli.write_all(&[4, 1, 0, 1, 1, 2, 3, 4, 0, 80])
                .await
                .unwrap();
            assert!(matches!(
                read_request(&mut srv).await,
                Err(Socks5Error::BadVersion(4))
            ));
            // Truncated → i/o error, never a panic.
            let (mut srv, mut cli) = pair();
            cli.write_all(&[5, 1, 0, 3, 200, b'a']).await.unwrap();
            drop(cli);
            assert!(matches!(
                read_request(&mut srv).await,
                Err(Socks5Error::Io(_))
            ));
        });
    }

    #[test]
    fn userpass_negotiation() {
        rt().block_on(async {
            let cfg = Socks5Config { username: "alice".into(), password: "s3cret".into() };
            let (mut srv, mut cli) = pair();
            cli.write_all(&[5, 2, 0, 2, 1, 5]).await.unwrap();
            cli.write_all(b"alice").await.unwrap();
            cli.write_all(&[6]).await.unwrap();
            cli.write_all(b"s3cret").await.unwrap();
            negotiate(&mut srv, &cfg).await.unwrap();
            let mut r = [0u8; 4];
            cli.read_exact(&mut r).await.unwrap();
            assert_eq!(r, [5, 2, 1, 0]);

            let (mut srv, mut cli) = pair();
            cli.write_all(&[5, 1, 2, 1, 5]).await.unwrap();
            cli.write_all(b"alice").await.unwrap();
            cli.write_all(&[5]).await.unwrap();
            cli.write_all(b"wrong").await.unwrap();
            assert!(matches!(negotiate(&mut srv, &cfg).await, Err(Socks5Error::AuthFailed(u)) if u == "alice"));
            cli.read_exact(&mut r).await.unwrap();
            assert_eq!(r, [5, 2, 1, 1]);

            let (mut srv, mut cli) = pair();
            cli.write_all(&[5, 1, 0]).await.unwrap();
            assert!(matches!(negotiate(&mut srv, &cfg).await, Err(Socks5Error::NoAcceptableMethod { .. })));
            let mut r2 = [0u8; 2];
            cli.read_exact(&mut r2).await.unwrap();
            assert_eq!(r2, [5, 0xff]);
        });
    }

    #[test]
    fn udp_headers_parse_and_reject_bad_input() {
        let d = [0, 0, 0, 1, 127, 0, 0, 1, 0, 7, b'h', b'i'];
        let h = parse_udp_header(&d).unwrap();
        assert_eq!(
            h,
            UdpHeader {
                host: Host::Ip("127.0.0.1".parse().unwrap()),
                port: 7,
                len: 10
            }
        );
        assert_eq!(&d[h.len..], b"hi");
        let dom = [&[0u8, 0, 0, 3, 3][..], b"a.b", &[0, 53], b"q"].concat();
        assert_eq!(
            parse_udp_header(&dom).unwrap(),
            UdpHeader {
                host: Host::Domain("a.b".into()),
                port: 53,
                len: 10
            }
        );
        assert!(matches!(
            parse_udp_header(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 1]),
            Err(Socks5Error::Fragmented(1))
        ));
        assert!(matches!(
            parse_udp_header(&[0, 0, 0, 7]),
            Err(Socks5Error::BadAddressType(7))
        ));
        assert!(matches!(
            parse_udp_header(&[0, 0, 0, 3, 0xff, b'a', 0, 1]),
            Err(Socks5Error::DatagramTruncated(8))
        ));
        assert!(matches!(
            parse_udp_header(&[0, 0, 0, 3, 1, 0xff, 0, 1]),
            Err(Socks5Error::DomainNotUtf8(_))
        ));
        // Every prefix of valid headers fails cleanly, never panics.
        for v in [&d[..], &dom[..]] {
            for n in 0..10 {
                assert!(parse_udp_header(&v[..n]).is_err(), "prefix {n} of {v:?}");
            }
        }
        for b in 0..=255u8 {
            let _ = parse_udp_header(&[0, 0, 0, b, b, b]);
        }
    }
}
