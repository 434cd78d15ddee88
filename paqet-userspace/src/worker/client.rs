//! Client role: `transport.conn` sessions to `server.addr`, used round-robin, re-dialled with backoff when
//! they die, and the [`Tunnel`] handle front ends open streams with.
//!
//! Stream sequence (spec §3.9, matching upstream's captures): at session start one stream carrying
//! PTCPF(remote_flag), closed at once. Before every user stream: an empty liveness-probe stream (SYN, FIN),
//! a PTCPF re-send stream, then the PTCP/PUDP stream whose header is its first PSH frame.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use thiserror::Error;
use tracing::{info, warn};

use super::core::{spawn_link_rx, unix_now, Core, Shared};
use super::stream::TunnelStream;
use super::IoFactory;
use crate::proto::session::{Role, SessionConfigError, SessionError};
use crate::wire::envelope::EnvelopeBuilder;
use crate::wire::header::Header;

/// First re-dial delay after a session died; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// How long `open_*` keeps trying to find a live session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the client side.
#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("not a client worker")]
    NotClient,
    #[error("no {family} address configured for server {server}")]
    NoFamily {
        family: &'static str,
        server: SocketAddr,
    },
    #[error("opening packet I/O for local port {port}: {source}")]
    Io { port: u16, source: std::io::Error },
    #[error("building the envelope {src} -> {dst}: {msg}")]
    Envelope {
        src: SocketAddr,
        dst: SocketAddr,
        msg: String,
    },
    #[error("stream header for {what}: {msg}")]
    Header { what: String, msg: String },
    #[error("no live session to {server} after {secs} s")]
    NoSession { server: SocketAddr, secs: u64 },
    #[error("session: {0}")]
    Session(#[from] SessionError),
    #[error("session settings: {0}")]
    Config(#[from] SessionConfigError),
    #[error("no PONG: {0}")]
    Ping(String),
    #[error("local port {port} already carries a session to {server} (XDP mode: no free local port owned by this worker)")]
    PortBusy { port: u16, server: SocketAddr },
}

/// One `transport.conn` slot.
struct Slot {
    session: Option<u64>,
    backoff: Duration,
    next_try: Instant,
}

/// Client bookkeeping inside the core.
pub(crate) struct ClientState {
    slots: Vec<Slot>,
    rr: usize,
    pub(crate) factory: Option<IoFactory>,
    /// XDP mode: the worker's shared link (all sessions ride on it) and the port plan.
    shared: Option<SharedPorts>,
}

/// XDP mode: the worker's shared link, which carries every session of the worker.
#[derive(Clone, Copy, Debug)]
struct SharedPorts {
    link: u64,
}

impl ClientState {
    pub(crate) fn new(conn: usize) -> Self {
        let now = Instant::now();
        ClientState {
            slots: (0..conn)
                .map(|_| Slot {
                    session: None,
                    backoff: MIN_BACKOFF,
                    next_try: now,
                })
                .collect(),
            rr: 0,
            factory: None,
            shared: None,
        }
    }

    /// Session `id` died: its slot becomes re-diallable after the backoff.
    pub(crate) fn session_gone(&mut self, id: u64) {
        for s in &mut self.slots {
            if s.session == Some(id) {
                s.session = None;
                s.next_try = Instant::now() + s.backoff;
                s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Session `id` received a valid datagram: reset its slot's backoff.
    pub(crate) fn session_alive(&mut self, id: u64) {
        for s in &mut self.slots {
            if s.session == Some(id) {
                s.backoff = MIN_BACKOFF;
            }
        }
    }
}

/// Emits a header into a fresh vector.
pub(super) fn header_bytes(h: &Header) -> Result<Vec<u8>, TunnelError> {
    let mut v = Vec::with_capacity(h.encoded_len());
    h.try_emit(&mut v).map_err(|e| TunnelError::Header {
        what: format!("{h:?}"),
        msg: e.to_string(),
    })?;
    Ok(v)
}

/// Opens a stream on session `id`, writes `bytes` as its first frame and, if `close`, closes it at once.
pub(super) fn stream_with(
    c: &mut Core,
    id: u64,
    bytes: &[u8],
    close: bool,
) -> Result<u32, TunnelError> {
    let e = c.endpoint.get_mut(id).ok_or(SessionError::Dead)?;
    let sid = e.session.open_stream()?;
    if !bytes.is_empty() {
        let n = e.session.write(sid, bytes)?;
        if n != bytes.len() {
            // A fresh stream always has a 256 KiB window; anything else means the session is broken.
            e.session.close_stream(sid);
            return Err(SessionError::Dead.into());
        }
    }
    if close {
        e.session.close_stream(sid);
    }
    c.mark_dirty(id);
    Ok(sid)
}

/// The PTCPF header for our `remote_flag` list.
fn ptcpf(c: &Core) -> Header {
    Header::TcpFlags(c.cfg.remote_flags.iter().map(|f| f.0).collect())
}

/// Dials slot `slot`: new packet I/O on a (random) local port, new conv, session-start PTCPF.
pub(crate) fn dial_slot(shared: &Shared, slot: usize) -> Result<u64, TunnelError> {
    let (link_id, fd, retire, id) = {
        let mut guard = shared.borrow_mut();
        let c = &mut *guard;
        if c.cfg.role != Role::Client {
            return Err(TunnelError::NotClient);
        }
        let server = c.cfg.server_addr.ok_or(TunnelError::NotClient)?;
        let fam = *c.cfg.family_for(server.ip()).ok_or(TunnelError::NoFamily {
            family: if server.is_ipv4() { "IPv4" } else { "IPv6" },
            server,
        })?;
        let port = match (c.client.shared, c.router.as_ref()) {
            // XDP: a port this worker owns (owner = local port % workers) that no live session uses,
            // counting up from the configured (base) port.
            (Some(sp), Some(r)) => r
                .client_port(fam.addr.port(), |p| c.has_session_on(sp.link, p, server))
                .ok_or(TunnelError::PortBusy {
                    port: fam.addr.port(),
                    server,
                })?,
            _ => match fam.addr.port() {
                0 => rand::thread_rng().gen_range(32768..=65535u16),
                p => p,
            },
        };
        if let Some(sp) = c.client.shared {
            // A second live session on one local port would share the 4-tuple with the first (the
            // server would take it for a replacement).
            if c.has_session_on(sp.link, port, server) {
                return Err(TunnelError::PortBusy { port, server });
            }
        }
        let src = SocketAddr::new(fam.addr.ip(), port);
        let env = EnvelopeBuilder::new(
            c.cfg.local_mac,
            fam.router_mac,
            src,
            server,
            unix_now().as_millis() as u32,
        )
        .map_err(|e| TunnelError::Envelope {
            src,
            dst: server,
            msg: e.to_string(),
        })?;
        let (link_id, fd, retire, own_env) = match c.client.shared {
            // XDP: the worker's queue socket carries every session; the session keeps its own envelope.
            Some(sp) => (sp.link, None, None, Some(env)),
            None => {
                let factory = c.client.factory.as_mut().ok_or(TunnelError::NotClient)?;
                let io = factory(port).map_err(|source| TunnelError::Io { port, source })?;
                let (env4, env6) = if server.is_ipv4() {
                    (Some(env), None)
                } else {
                    (None, Some(env))
                };
                let (link_id, fd, retire) = c.add_link(io, port, env4, env6);
                (link_id, fd, Some(retire), None)
            }
        };
        let conv: u32 = rand::random();
        let id = c.connect(link_id, port, server, conv, own_env)?;
        if let Some(s) = c.client.slots.get_mut(slot) {
            s.session = Some(id);
        }
        let h = header_bytes(&ptcpf(c))?;
        stream_with(c, id, &h, true)?;
        info!(slot, local = %src, %server, conv, "session dialled");
        (link_id, fd, retire, id)
    };
    super::reverse::spawn_control(shared, id, slot);
    if let Some(retire) = retire {
        spawn_link_rx(shared.clone(), link_id, fd, retire);
    }
    Ok(id)
}

/// Starts a client worker's sessions (all `transport.conn` of them). A failure here is fatal (as upstream).
pub(crate) fn start(shared: &Shared, factory: IoFactory) -> Result<(), TunnelError> {
    let n = {
        let mut c = shared.borrow_mut();
        c.client.factory = Some(factory);
        c.client.slots.len()
    };
    super::reverse::start_client(shared);
    for slot in 0..n {
        dial_slot(shared, slot)?;
    }
    tokio::task::spawn_local(maintain(shared.clone()));
    Ok(())
}

/// XDP mode: starts a client worker whose sessions all ride on shared link `link` (already added with
/// [`Core::add_shared_link`], its RX task started by the caller), each on its own local port owned by this
/// worker, counting up from the configured (base) port (`xdp::Router::client_port`; the XDP program steers
/// every frame from the server). It keeps `slots` sessions up (0 = the worker only receives frames and hands
/// them to their owner).
pub(crate) fn start_shared(shared: &Shared, link: u64, slots: usize) -> Result<(), TunnelError> {
    let n = {
        let mut c = shared.borrow_mut();
        if c.cfg.role != Role::Client {
            return Err(TunnelError::NotClient);
        }
        c.client = ClientState::new(slots);
        c.client.shared = Some(SharedPorts { link });
        c.client.slots.len()
    };
    super::reverse::start_client(shared);
    for slot in 0..n {
        dial_slot(shared, slot)?;
    }
    tokio::task::spawn_local(maintain(shared.clone()));
    Ok(())
}

/// Dead slots whose backoff elapsed (their sessions were removed by the core).
fn due_slots(shared: &Shared) -> Vec<usize> {
    let c = shared.borrow();
    let now = Instant::now();
    c.client
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.session.is_none() && s.next_try <= now)
        .map(|(i, _)| i)
        .collect()
}

/// Re-dials dead slots whose backoff elapsed; a failed dial doubles the slot's backoff.
fn redial_due(shared: &Shared) {
    for slot in due_slots(shared) {
        if let Err(e) = dial_slot(shared, slot) {
            warn!(slot, error = %e, "re-dial failed");
            let mut c = shared.borrow_mut();
            if let Some(s) = c.client.slots.get_mut(slot) {
                s.next_try = Instant::now() + s.backoff;
                s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Background task: keeps `transport.conn` sessions up, so a dead one is replaced even while no new
/// stream is being opened (the others keep working meanwhile).
async fn maintain(shared: Shared) {
    loop {
        tokio::time::sleep(MIN_BACKOFF).await;
        redial_due(&shared);
    }
}

/// Handle the front ends use to open tunnel streams. Cheap to clone; `!Send` (lives on the worker).
#[derive(Clone)]
pub struct Tunnel {
    shared: Shared,
}

impl Tunnel {
    pub(crate) fn new(shared: Shared) -> Self {
        Tunnel { shared }
    }

    /// The worker's shared state (for metrics and tests).
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Opens a PTCP stream to `host:port` (resolved on the server). The server dials after receiving the
    /// header; there is no reply: a failed dial shows up as end of stream.
    pub async fn open_tcp(&self, host: &str, port: u16) -> Result<TunnelStream, TunnelError> {
        self.open(Header::Tcp {
            host: host.to_owned(),
            port,
        })
        .await
    }

    /// Opens a PUDP stream to `host:port`: use [`TunnelStream::send_datagram`] / `recv_datagram`.
    pub async fn open_udp(&self, host: &str, port: u16) -> Result<TunnelStream, TunnelError> {
        self.open(Header::Udp {
            host: host.to_owned(),
            port,
        })
        .await
    }

    /// A PING/PONG round trip on the next session; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, TunnelError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let t0 = Instant::now();
        let (id, sid) = self.pick_and_open(None).await?;
        let mut s = TunnelStream::attach(self.shared.clone(), id, sid);
        let ping = header_bytes(&Header::Ping)?;
        s.write_all(&ping)
            .await
            .map_err(|e| TunnelError::Ping(e.to_string()))?;
        let mut reply = [0u8; 5];
        s.read_exact(&mut reply)
            .await
            .map_err(|e| TunnelError::Ping(e.to_string()))?;
        match Header::parse(&reply) {
            Ok(Some((Header::Pong, _))) => Ok(t0.elapsed()),
            other => Err(TunnelError::Ping(format!(
                "unexpected reply {reply:02x?} ({other:?})"
            ))),
        }
    }

    async fn open(&self, header: Header) -> Result<TunnelStream, TunnelError> {
        let bytes = header_bytes(&header)?;
        let (id, sid) = self.pick_and_open(Some(&bytes)).await?;
        Ok(TunnelStream::attach(self.shared.clone(), id, sid))
    }

    /// Upstream's `newStrm`: next live session round-robin (re-dialling dead slots whose backoff passed),
    /// liveness probe, PTCPF re-send, then the stream itself (with `first` as its first frame).
    async fn pick_and_open(&self, first: Option<&[u8]>) -> Result<(u64, u32), TunnelError> {
        let deadline = Instant::now() + OPEN_TIMEOUT;
        loop {
            // Re-dial dead slots whose backoff elapsed.
            {
                if self.shared.borrow().cfg.role != Role::Client {
                    return Err(TunnelError::NotClient);
                }
            }
            redial_due(&self.shared);
            {
                let mut guard = self.shared.borrow_mut();
                let c = &mut *guard;
                let n = c.client.slots.len();
                for k in 0..n {
                    let i = (c.client.rr + k) % n;
                    let Some(id) = c.client.slots[i].session else {
                        continue;
                    };
                    let alive = c.endpoint.get(id).is_some_and(|e| !e.session.is_dead());
                    if !alive {
                        c.kill_session(id, "found dead when opening a stream");
                        continue;
                    }
                    c.client.rr = (i + 1) % n;
                    let r = (|| -> Result<u32, TunnelError> {
                        stream_with(c, id, &[], true)?; // liveness probe
                        let h = header_bytes(&ptcpf(c))?;
                        stream_with(c, id, &h, true)?; // PTCPF re-send
                        let sid = stream_with(c, id, first.unwrap_or(&[]), false)?;
                        c.register_stream(id, sid);
                        Ok(sid)
                    })();
                    match r {
                        Ok(sid) => return Ok((id, sid)),
                        Err(e) => {
                            warn!(slot = i, error = %e, "session failed while opening a stream");
                            c.kill_session(id, "stream open failed");
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                let server = self
                    .shared
                    .borrow()
                    .cfg
                    .server_addr
                    .ok_or(TunnelError::NotClient)?;
                return Err(TunnelError::NoSession {
                    server,
                    secs: OPEN_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
