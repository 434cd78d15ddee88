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
use super::ServerTarget;
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

/// First retry delay of a server that stopped answering; doubles (jittered) up to [`MAX_SERVER_BACKOFF`].
const MIN_SERVER_BACKOFF: Duration = Duration::from_secs(1);
const MAX_SERVER_BACKOFF: Duration = Duration::from_secs(30);
/// How long a session moved off its slot for a rejoining server keeps carrying its open streams.
const REBALANCE_DRAIN: Duration = Duration::from_secs(60);

/// One `transport.conn` slot.
struct Slot {
    session: Option<u64>,
    /// Index into [`ClientState::servers`] of the server the slot's session goes to.
    server: usize,
    backoff: Duration,
    next_try: Instant,
    /// `transport.rotate.after`: when the slot's session is to be replaced (jittered).
    rotate_at: Option<Instant>,
}

/// Client bookkeeping inside the core.
pub(crate) struct ClientState {
    slots: Vec<Slot>,
    /// The configured servers with their health (one for a plain `server.addr`).
    servers: Servers,
    rr: usize,
    pub(crate) factory: Option<IoFactory>,
    /// XDP mode: the worker's shared link (all sessions ride on it) and the port plan.
    shared: Option<SharedPorts>,
    /// Rotated-out sessions still carrying streams, with the time they are closed anyway.
    /// (Also sessions moved off a slot for a rejoining server, or off a server taken out: `rotated` false.)
    draining: Vec<(u64, Instant, bool)>,
}

/// XDP mode: the worker's shared link, which carries every session of the worker.
#[derive(Clone, Copy, Debug)]
struct SharedPorts {
    link: u64,
}

impl ClientState {
    pub(crate) fn new(conn: usize, servers: Vec<ServerTarget>) -> Self {
        let now = Instant::now();
        ClientState {
            servers: Servers::new(servers, now),
            slots: (0..conn)
                .map(|_| Slot {
                    session: None,
                    server: 0,
                    backoff: MIN_BACKOFF,
                    next_try: now,
                    rotate_at: None,
                })
                .collect(),
            rr: 0,
            factory: None,
            shared: None,
            draining: Vec::new(),
        }
    }

    /// Session `id` died: its slot becomes re-diallable after the backoff. A slot's session dying (keepalive
    /// timeout, failed stream open) takes its server out when several are configured: the slot is re-dialled
    /// to another one at once; a dead probe doubles its server's retry delay.
    pub(crate) fn session_gone(&mut self, id: u64) {
        let now = Instant::now();
        let several = self.servers.list.len() > 1;
        for s in &mut self.slots {
            if s.session == Some(id) {
                s.session = None;
                if several {
                    self.servers.mark_down(s.server, now, "its session died");
                    s.next_try = now;
                } else {
                    s.next_try = now + s.backoff;
                    s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Some(i) = self.servers.list.iter().position(|v| v.probe == Some(id)) {
            self.servers.list[i].probe = None;
            self.servers.mark_down(i, now, "the retry got no answer");
        }
    }

    /// Session `id` received a valid datagram: reset its slot's backoff; a probe's server rejoins: the
    /// probe takes over a slot of the server most above its weighted share (that slot's session drains).
    pub(crate) fn session_alive(&mut self, id: u64) {
        for s in &mut self.slots {
            if s.session == Some(id) {
                s.backoff = MIN_BACKOFF;
                // A slot dialled to a down server (all were down) that answers brings it back.
                self.servers.mark_up(s.server);
            }
        }
        let Some(i) = self.servers.list.iter().position(|v| v.probe == Some(id)) else {
            return;
        };
        self.servers.list[i].probe = None;
        self.servers.mark_up(i);
        let counts = self.slot_counts();
        if let Some(slot) = rebalance_slot(&self.servers.weights(), &counts, &self.servers.up(), i)
            .and_then(|from| {
                self.slots
                    .iter()
                    .position(|s| s.server == from && s.session.is_some())
            })
        {
            let s = &mut self.slots[slot];
            if let Some(old) = s.session.replace(id) {
                self.draining
                    .push((old, Instant::now() + REBALANCE_DRAIN, false));
            }
            s.server = i;
            s.backoff = MIN_BACKOFF;
            info!(slot, server = %self.servers.list[i].target.addr, "session placed on the rejoined server");
        } else {
            // Nothing to move (every slot is on its share): the probe is not needed.
            self.draining.push((id, Instant::now(), false));
        }
    }

    /// Live slot sessions per server.
    fn slot_counts(&self) -> Vec<usize> {
        let mut n = vec![0; self.servers.list.len()];
        for s in &self.slots {
            if s.session.is_some() {
                if let Some(c) = n.get_mut(s.server) {
                    *c += 1;
                }
            }
        }
        n
    }

    /// Per-server figures for metrics (`paqet_server_*`).
    pub(crate) fn server_stats(&self) -> Vec<crate::ops::ServerSnapshot> {
        let counts = self.slot_counts();
        self.servers
            .list
            .iter()
            .zip(counts)
            .map(|(v, n)| crate::ops::ServerSnapshot {
                server: v.target.addr.to_string(),
                up: v.up,
                slots: self.slots.len() as u64,
                sessions: n as u64,
                dial_failures: v.dial_failures,
            })
            .collect()
    }
}

/// One configured server and its health.
#[derive(Debug)]
struct ServerHealth {
    target: ServerTarget,
    up: bool,
    /// Smooth weighted round robin: current weight.
    current: i64,
    backoff: Duration,
    /// When a down server is tried again (a probe session).
    retry_at: Instant,
    /// The probe session to a down server, while it waits for an answer.
    probe: Option<u64>,
    dial_failures: u64,
}

/// The servers of a client: weighted placement and health (pure logic; no runtime).
#[derive(Debug)]
struct Servers {
    list: Vec<ServerHealth>,
}

impl Servers {
    fn new(targets: Vec<ServerTarget>, now: Instant) -> Self {
        Servers {
            list: targets
                .into_iter()
                .map(|target| ServerHealth {
                    target,
                    up: true,
                    current: 0,
                    backoff: MIN_SERVER_BACKOFF,
                    retry_at: now,
                    probe: None,
                    dial_failures: 0,
                })
                .collect(),
        }
    }

    fn weights(&self) -> Vec<u32> {
        self.list.iter().map(|v| v.target.weight).collect()
    }

    fn up(&self) -> Vec<bool> {
        self.list.iter().map(|v| v.up).collect()
    }

    /// Smooth weighted round robin over the healthy servers. With none healthy: the first server (a single
    /// server is never taken out; with several, a dial goes on trying the first one).
    fn place(&mut self) -> usize {
        let total: i64 = self
            .list
            .iter()
            .filter(|v| v.up)
            .map(|v| i64::from(v.target.weight))
            .sum();
        if total == 0 {
            return 0;
        }
        for v in self.list.iter_mut().filter(|v| v.up) {
            v.current += i64::from(v.target.weight);
        }
        // The highest current weight wins; ties go to the earlier server.
        let b = self
            .list
            .iter()
            .enumerate()
            .filter(|(_, v)| v.up)
            .max_by(|x, y| x.1.current.cmp(&y.1.current).then(y.0.cmp(&x.0)))
            .map_or(0, |(i, _)| i);
        self.list[b].current -= total;
        b
    }

    /// Server `i` stopped answering: out of placement, retried after a jittered, doubling delay. Logged
    /// once per transition.
    fn mark_down(&mut self, i: usize, now: Instant, why: &str) {
        if self.list.len() < 2 {
            return;
        }
        let Some(v) = self.list.get_mut(i) else {
            return;
        };
        if v.up {
            v.up = false;
            v.backoff = MIN_SERVER_BACKOFF;
            warn!(server = %v.target.addr, reason = why, "server down: its slots go to the other servers; retried with backoff");
        } else {
            v.backoff = (v.backoff * 2).min(MAX_SERVER_BACKOFF);
        }
        v.current = 0;
        v.retry_at = now + v.backoff.mul_f64(rand::thread_rng().gen_range(0.75..=1.25));
    }

    fn mark_up(&mut self, i: usize) {
        if let Some(v) = self.list.get_mut(i) {
            if !v.up {
                v.up = true;
                v.backoff = MIN_SERVER_BACKOFF;
                v.current = 0;
                info!(server = %v.target.addr, "server up again: new sessions are placed on it");
            }
        }
    }

    /// Down servers whose retry is due and that have no probe out.
    fn due_probes(&self, now: Instant) -> Vec<usize> {
        self.list
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.up && v.probe.is_none() && v.retry_at <= now)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Which server gives up a slot when server `to` rejoins: the healthy one (not `to`) with the most slots
/// per weight, if moving one of its slots to `to` still leaves it at least as loaded (per weight) as `to`;
/// `None` when nothing would get more even.
fn rebalance_slot(weights: &[u32], counts: &[usize], up: &[bool], to: usize) -> Option<usize> {
    let w = |i: usize| u64::from(weights.get(i).copied().unwrap_or(1).max(1));
    let c = |i: usize| counts.get(i).copied().unwrap_or(0) as u64;
    let from = (0..weights.len())
        .filter(|&i| i != to && c(i) > 0 && up.get(i).copied().unwrap_or(false))
        // Highest c/w: compare c_a * w_b with c_b * w_a.
        .max_by(|&a, &b| (c(a) * w(b)).cmp(&(c(b) * w(a))))?;
    // (c_from - 1) / w_from >= (c_to + 1) / w_to
    ((c(from) - 1) * w(to) >= (c(to) + 1) * w(from)).then_some(from)
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

/// Dials slot `slot` on the next server by weight (see [`dial`]); a failed dial counts against that
/// server and takes it out (when several are configured).
pub(crate) fn dial_slot(shared: &Shared, slot: usize) -> Result<u64, TunnelError> {
    let server = {
        let mut c = shared.borrow_mut();
        if c.cfg.role != Role::Client {
            return Err(TunnelError::NotClient);
        }
        let si = c.client.servers.place();
        if let Some(s) = c.client.slots.get_mut(slot) {
            s.server = si;
        }
        si
    };
    dial_checked(shared, server, Some(slot))
}

/// [`dial`], counting a failure against the server.
fn dial_checked(shared: &Shared, server: usize, slot: Option<usize>) -> Result<u64, TunnelError> {
    dial(shared, server, slot).inspect_err(|_| {
        let mut c = shared.borrow_mut();
        if let Some(v) = c.client.servers.list.get_mut(server) {
            v.dial_failures += 1;
        }
        c.client
            .servers
            .mark_down(server, Instant::now(), "dialling failed");
    })
}

/// Dials a session to server `si` (for slot `slot`, or a probe when `None`): new packet I/O on a
/// (random) local port, new conv, session-start PTCPF.
fn dial(shared: &Shared, si: usize, slot: Option<usize>) -> Result<u64, TunnelError> {
    let (link_id, fd, retire, id) = {
        let mut guard = shared.borrow_mut();
        let c = &mut *guard;
        if c.cfg.role != Role::Client {
            return Err(TunnelError::NotClient);
        }
        let target = c
            .client
            .servers
            .list
            .get(si)
            .map(|v| v.target)
            .ok_or(TunnelError::NotClient)?;
        let server = target.addr;
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
            target.router_mac,
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
        let after = c.cfg.rotate.after_secs;
        match slot.and_then(|i| c.client.slots.get_mut(i)) {
            Some(s) => {
                s.session = Some(id);
                s.rotate_at = (after > 0).then(|| Instant::now() + jittered(after));
            }
            None => {
                if let Some(v) = c.client.servers.list.get_mut(si) {
                    v.probe = Some(id);
                }
            }
        }
        let h = header_bytes(&ptcpf(c))?;
        stream_with(c, id, &h, true)?;
        info!(?slot, local = %src, %server, conv, "session dialled");
        (link_id, fd, retire, id)
    };
    if let Some(slot) = slot {
        super::reverse::spawn_control(shared, id, slot);
    }
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
        c.client = ClientState::new(slots, c.cfg.server_targets());
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

/// Dead slots whose backoff elapsed (their sessions were removed by the core). A slot whose server was
/// taken out gives up its session (which drains) so that it is re-dialled to a healthy server.
fn due_slots(shared: &Shared) -> Vec<usize> {
    let mut guard = shared.borrow_mut();
    let c = &mut *guard;
    let now = Instant::now();
    let up = c.client.servers.up();
    if up.iter().any(|u| *u) {
        for s in &mut c.client.slots {
            if !up.get(s.server).copied().unwrap_or(true) {
                if let Some(old) = s.session.take() {
                    c.client.draining.push((old, now + REBALANCE_DRAIN, false));
                    s.next_try = now;
                }
            }
        }
    }
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

/// `after` seconds ±20 % (so the sessions of many clients, or of one client's slots, do not rotate in step).
fn jittered(after: u32) -> Duration {
    Duration::from_secs(u64::from(after)).mul_f64(rand::thread_rng().gen_range(0.8..=1.2))
}

/// `transport.rotate`: replaces every live session past its age or byte trigger by a fresh one (new
/// conv, new source port, dialled like any session) that takes the new streams, and keeps the old one for
/// its open streams until they have ended or `transport.rotate.drain` has passed; then closes it. Each
/// session is an ordinary upstream session, so this works against any server.
fn rotate_due(shared: &Shared) {
    let now = Instant::now();
    let (rot, due) = {
        let c = shared.borrow();
        let rot = c.cfg.rotate;
        if !rot.enabled() {
            return;
        }
        let due: Vec<(usize, u64, &'static str)> = c
            .client
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let id = s.session?;
                let e = c.endpoint.get(id).filter(|e| !e.session.is_dead())?;
                let st = e.session.stats();
                if s.rotate_at.is_some_and(|t| now >= t) {
                    Some((i, id, "age"))
                } else if rot.bytes > 0 && st.bytes_in.saturating_add(st.bytes_out) >= rot.bytes {
                    Some((i, id, "bytes"))
                } else {
                    None
                }
            })
            .collect();
        (rot, due)
    };
    for (slot, old, why) in due {
        let old_server = shared.borrow().client.slots.get(slot).map(|s| s.server);
        match dial_slot(shared, slot) {
            Ok(new) => {
                info!(
                    slot,
                    old,
                    new,
                    trigger = why,
                    "session rotated: new streams use the new session, the old one drains"
                );
                let drain = now + Duration::from_secs(u64::from(rot.drain_secs));
                shared.borrow_mut().client.draining.push((old, drain, true));
            }
            Err(e) => {
                warn!(slot, error = %e, "session rotation: dialling the new session failed; the current one stays");
                let mut c = shared.borrow_mut();
                if let Some(s) = c.client.slots.get_mut(slot) {
                    s.session = Some(old);
                    s.server = old_server.unwrap_or(s.server);
                    s.rotate_at = Some(now + MAX_BACKOFF);
                }
            }
        }
    }
}

/// Closes the rotated-out (or rebalanced) sessions whose streams have all ended or whose drain time is
/// over.
fn close_drained(shared: &Shared) {
    let now = Instant::now();
    let mut c = shared.borrow_mut();
    let draining = std::mem::take(&mut c.client.draining);
    for (id, deadline, rotated) in draining {
        let streams = match c.endpoint.get(id) {
            None => continue, // already gone
            Some(e) => e.streams(),
        };
        if streams == 0 {
            c.kill_session(
                id,
                if rotated {
                    "rotated out: its streams have ended"
                } else {
                    "moved to another server: its streams have ended"
                },
            );
        } else if now >= deadline {
            c.kill_session(
                id,
                if rotated {
                    "rotated out: transport.rotate.drain passed"
                } else {
                    "moved to another server: its drain time passed"
                },
            );
        } else {
            c.client.draining.push((id, deadline, rotated));
        }
    }
}

/// Background task: keeps `transport.conn` sessions up, so a dead one is replaced even while no new
/// stream is being opened (the others keep working meanwhile), and rotates them (`transport.rotate`).
async fn maintain(shared: Shared) {
    loop {
        tokio::time::sleep(MIN_BACKOFF).await;
        redial_due(&shared);
        probe_due(&shared);
        rotate_due(&shared);
        close_drained(&shared);
    }
}

/// Several servers: a down server whose retry delay passed gets a probe session (an ordinary session);
/// its first answer brings the server back ([`ClientState::session_alive`]), its death doubles the delay.
fn probe_due(shared: &Shared) {
    let due = shared.borrow().client.servers.due_probes(Instant::now());
    for si in due {
        if let Err(e) = dial_checked(shared, si, None) {
            warn!(server = si, error = %e, "retrying a down server: dialling failed");
        }
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
                    let si = c.client.slots[i].server;
                    if c.client.servers.list.get(si).is_some_and(|v| !v.up) {
                        continue;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(weights: &[u32]) -> Vec<ServerTarget> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| ServerTarget {
                addr: SocketAddr::from(([10, 0, 0, 2 + i as u8], 9999)),
                weight,
                router_mac: [2, 0, 0, 0, 0, 1],
            })
            .collect()
    }

    #[test]
    fn placement_follows_the_weights_smoothly() {
        let mut s = Servers::new(targets(&[3, 1, 1]), Instant::now());
        let picks: Vec<usize> = (0..10).map(|_| s.place()).collect();
        let count = |k| picks.iter().filter(|&&p| p == k).count();
        assert_eq!((count(0), count(1), count(2)), (6, 2, 2), "{picks:?}");
        // Smooth: the heavy server is never picked three times in a row within one period.
        assert!(
            !picks[..5].windows(3).any(|w| w.iter().all(|&p| p == 0)),
            "{picks:?}"
        );
    }

    #[test]
    fn a_down_server_gets_nothing_and_backs_off_then_rejoins() {
        let now = Instant::now();
        let mut s = Servers::new(targets(&[1, 1, 1]), now);
        s.mark_down(1, now, "test");
        assert!(!s.list[1].up);
        let picks: Vec<usize> = (0..6).map(|_| s.place()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        // Jittered first delay around MIN_SERVER_BACKOFF; each failed retry doubles it, bounded.
        let first = s.list[1].retry_at - now;
        assert!(
            first >= MIN_SERVER_BACKOFF.mul_f64(0.75) && first <= MIN_SERVER_BACKOFF.mul_f64(1.25)
        );
        assert!(s.due_probes(now).is_empty());
        assert_eq!(s.due_probes(now + MIN_SERVER_BACKOFF * 2), vec![1]);
        for _ in 0..20 {
            s.mark_down(1, now, "retry failed");
        }
        assert_eq!(s.list[1].backoff, MAX_SERVER_BACKOFF);
        assert!(s.list[1].retry_at - now <= MAX_SERVER_BACKOFF.mul_f64(1.25));
        s.mark_up(1);
        assert!(s.list[1].up && s.list[1].backoff == MIN_SERVER_BACKOFF);
        let picks: Vec<usize> = (0..6).map(|_| s.place()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 2, "{picks:?}");
    }

    #[test]
    fn a_single_server_is_never_taken_out() {
        let now = Instant::now();
        let mut s = Servers::new(targets(&[1]), now);
        s.mark_down(0, now, "test");
        assert!(s.list[0].up);
        assert_eq!(s.place(), 0);
    }

    #[test]
    fn all_down_still_places_somewhere() {
        let now = Instant::now();
        let mut s = Servers::new(targets(&[1, 1]), now);
        s.mark_down(0, now, "test");
        s.mark_down(1, now, "test");
        assert_eq!(s.place(), 0);
    }

    #[test]
    fn rejoin_takes_a_slot_from_the_most_loaded_server() {
        let up = [true, true, true];
        // Server 2 came back with no slots; server 0 carries two of three.
        assert_eq!(rebalance_slot(&[1, 1, 1], &[2, 1, 0], &up, 2), Some(0));
        // Already at its share: nothing moves.
        assert_eq!(rebalance_slot(&[1, 1, 1], &[1, 1, 1], &up, 2), None);
        // Weight 2 of 4 with 4 slots: a share of 2; it has 1, server 1 (weight 1) has 2.
        assert_eq!(rebalance_slot(&[1, 1, 2], &[1, 2, 1], &up, 2), Some(1));
        // Nobody above its share (fewer slots than servers): nothing moves.
        assert_eq!(
            rebalance_slot(&[1, 1, 1, 1], &[1, 1, 0, 0], &[true; 4], 3),
            None
        );
    }

    #[test]
    fn a_dead_slot_session_takes_its_server_out_and_a_probe_brings_it_back() {
        let mut c = ClientState::new(3, targets(&[1, 1, 1]));
        for (i, s) in c.slots.iter_mut().enumerate() {
            s.server = i;
            s.session = Some(10 + i as u64);
        }
        c.session_gone(12);
        assert!(!c.servers.list[2].up);
        assert!(c.slots[2].session.is_none());
        // The slot is re-dialled elsewhere (here: by hand on server 0).
        c.slots[2].server = c.servers.place();
        assert_ne!(c.slots[2].server, 2);
        c.slots[2].session = Some(20);
        // A probe that dies doubles the delay; one that answers brings the server back and takes a slot.
        c.servers.list[2].probe = Some(30);
        c.session_gone(30);
        assert!(!c.servers.list[2].up && c.servers.list[2].backoff == MIN_SERVER_BACKOFF * 2);
        c.servers.list[2].probe = Some(31);
        c.session_alive(31);
        assert!(c.servers.list[2].up);
        assert!(c
            .slots
            .iter()
            .any(|s| s.session == Some(31) && s.server == 2));
        assert_eq!(c.slot_counts(), vec![1, 1, 1]);
        assert_eq!(c.draining.len(), 1, "the displaced session drains");
        let st = c.server_stats();
        assert!(st.iter().all(|s| s.up && s.sessions == 1));
    }

    #[test]
    fn a_slot_session_on_a_down_server_that_answers_brings_it_back() {
        let mut c = ClientState::new(2, targets(&[1, 1]));
        let now = Instant::now();
        c.servers.mark_down(0, now, "test");
        c.servers.mark_down(1, now, "test");
        // Everything down: a slot is dialled to the first server anyway; its answer brings it back.
        c.slots[0].server = c.servers.place();
        c.slots[0].session = Some(5);
        c.session_alive(5);
        assert!(c.servers.list[0].up && !c.servers.list[1].up);
    }
}
