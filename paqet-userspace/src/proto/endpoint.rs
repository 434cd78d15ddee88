//! The endpoint: one worker's session table and every decision about a received datagram, as a sans-IO
//! state machine (no tokio, no sockets, no clock: the caller passes the session ms clock `now` and, for
//! the guard, unix seconds).
//!
//! The worker parses the envelope (Ethernet/IP/TCP) and hands the TCP payload to [`Endpoint::handle`]
//! with the link it came on, the local port and the peer's address. The endpoint
//!
//! 1. checks the guard prefix (spec §5) and strips it;
//! 2. on a client, drops datagrams from anyone but the configured server(s);
//! 3. routes the datagram to the session of `(link, local port, peer)` (the `by_peer` index), or on a
//!    server learns a new session: the conv comes from a decrypted copy (trial decryption with the
//!    configured key), `max_sessions` is applied first. Only a datagram that starts a session opens one:
//!    its first KCP segment is a PUSH with sn = 0 and its conv was never used by a session before (the
//!    replay filter, [`crate::proto::replay`], shared by the daemon's workers and persisted by the daemon);
//!    a recorded datagram replayed from any address opens nothing, so nothing is ever sent to it;
//! 4. replaces a server session when the same source starts a new conversation (a datagram the session's
//!    KCP rejects whose first segment is a PUSH with another conv, sn = 0, and a conv the replay filter has
//!    never seen: a client restarted on the same port, spec §3.5); the datagram is consumed and the
//!    client's retransmission opens the new session. A replayed first datagram of an older session (its
//!    conv seen) replaces nothing;
//! 5. counts what it refused ([`EndpointStats`]) and remembers sources that fail the guard or the crypto
//!    check with no session of their own ([`Endpoint::bad_sources`]: the signature of a peer with another
//!    key or guard setting).
//!
//! It answers with a [`DatagramEvent`]: which session took the datagram (the worker flushes it), which was
//! opened, which was closed and why (the worker wakes its stream tasks and, on a client, re-dials), or
//! why the datagram was dropped. It also owns the stream admission of the server's limits
//! ([`Limits`]): streams the peer opens ([`Endpoint::admit_peer_stream`]) and proxied streams
//! ([`Endpoint::admit_data_stream`] / [`Endpoint::end_data_stream`]).
//!
//! The worker keeps the I/O: links and envelopes, the RX arena, the XDP router hand-off, timers, wakers
//! and stream tasks. Its per-session I/O state rides in the session table as the `T` of [`Endpoint<T>`]
//! ([`Entry::io`]) rather than in a parallel map keyed by the same id: one lookup per datagram, no second
//! map to keep in step when sessions come and go, and a closed session hands its `T` back in
//! [`Closed`] so the worker can wake the tasks waiting on it. The endpoint never looks inside `T`
//! (`T: Default` fills it for the sessions it learns itself; the tests use `()`).
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{debug, info, trace};

use crate::proto::guard::{Addressing, Guard};
use crate::proto::limits::{LimitCounts, LimitKey};
use crate::proto::replay::{ReplayGate, DEFAULT_HORIZON_SECS};
use crate::proto::session::{Role, Session, SessionConfig, SessionConfigError, SessionError};
use crate::wire::crypt::Crypto;
use crate::wire::kcp::CMD_PUSH;

/// Looked up per datagram: foldhash (randomly seeded per process) instead of SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A session's id, unique for the endpoint's life (never reused).
pub type SessionId = u64;

/// The session table: id → session and its bookkeeping.
pub type SessionTable<T> = HashMap<SessionId, Entry<T>>;

/// Sources that failed the guard or crypto check with no session: source → failures.
pub type BadSources = HashMap<SocketAddr, u64>;

/// Streams beyond the stream limits that may wait for their header (control streams, slow headers).
pub const PENDING_STREAM_SLACK: usize = 64;

/// Sources remembered in [`Endpoint::bad_sources`].
pub const MAX_BAD_SOURCES: usize = 256;

/// Server limits; `None` = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: Option<usize>,
    pub max_streams_total: Option<usize>,
    pub max_streams_per_session: Option<usize>,
}

/// What an endpoint is built from.
#[derive(Clone)]
pub struct EndpointConfig {
    pub role: Role,
    /// Settings of every session (validated by [`Endpoint::new`]).
    pub session: SessionConfig,
    /// Client: the only source datagrams are accepted from (`server.addr`).
    pub server_addr: Option<SocketAddr>,
    /// Client with several servers: the other sources accepted too (every configured server).
    pub more_servers: Vec<SocketAddr>,
    /// Server limits.
    pub limits: Limits,
    /// Packet guard (`None` = off: the wire is exactly upstream's).
    pub guard: Option<Guard>,
    /// Server: the convs already used by sessions (shared by the daemon's workers). `None` on a server: a
    /// private in-memory filter with the default horizon. Unused on a client.
    pub replay: Option<Arc<dyn ReplayGate>>,
}

/// The counters the endpoint decides (the worker copies them into its `DaemonStats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Payloads without a valid guard prefix (dropped before decryption).
    pub rx_guard_drops: u64,
    /// Client: payloads from a source other than `server.addr`.
    pub rx_foreign: u64,
    /// Payloads for which no session exists and none may be created.
    pub rx_no_session: u64,
    /// Crypto (CRC / GCM tag / too short) failures.
    pub rx_crypto_failures: u64,
    /// Other per-datagram session errors (FEC, KCP, smux).
    pub rx_session_errors: u64,
    /// Server: session starts refused because their conv was already used (a replay).
    pub rx_replay_drops: u64,
    pub sessions_opened: u64,
    pub sessions_closed: u64,
    /// Server: new sessions refused by `max_sessions`.
    pub sessions_rejected: u64,
    /// Server: sessions replaced by a new conv from the same source (spec §3.5).
    pub sessions_replaced: u64,
    /// Streams registered with [`Endpoint::stream_opened`].
    pub streams_opened: u64,
    /// Server: streams closed at once by `max_streams_*`.
    pub streams_rejected: u64,
    /// Server: sessions and streams refused, per limit key (`header_timeout` is the worker's to count).
    pub limit_refusals: LimitCounts,
}

/// One session of the table and its bookkeeping.
pub struct Entry<T> {
    pub session: Session,
    /// The worker's per-session I/O state.
    pub io: T,
    link: u64,
    local_port: u16,
    peer: SocketAddr,
    last_rx: Option<u32>,
    /// Registered (task-held) streams.
    streams: usize,
    /// Proxied streams counted against `max_streams_per_session`.
    data_streams: usize,
}

impl<T> Entry<T> {
    /// The peer (client address on a server, server address on a client).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The link (packet-I/O backend) the session's frames use.
    pub fn link(&self) -> u64 {
        self.link
    }

    /// The local TCP port the session's frames carry.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// When a datagram of this session last authenticated (`now` clock); `None` = never.
    pub fn last_rx(&self) -> Option<u32> {
        self.last_rx
    }

    /// Registered streams.
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Proxied streams admitted by [`Endpoint::admit_data_stream`] and not ended yet.
    pub fn data_streams(&self) -> usize {
        self.data_streams
    }
}

/// Why a session was closed.
#[derive(Debug)]
pub enum CloseReason {
    /// Server: the same source started a new conversation (spec §3.5).
    Replaced,
    /// The session said it is dead (keepalive timeout, closed).
    Dead,
    /// A datagram broke the session (an smux protocol error).
    Failed(SessionError),
    /// Closed by the worker, for the reason given.
    Local(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Replaced => f.write_str("replaced by a new conversation"),
            CloseReason::Dead => f.write_str("session dead"),
            CloseReason::Failed(e) => write!(f, "{e}"),
            CloseReason::Local(why) => f.write_str(why),
        }
    }
}

/// A session the endpoint removed: what the worker needs to clean up after it.
pub struct Closed<T> {
    pub id: SessionId,
    pub peer: SocketAddr,
    pub link: u64,
    pub local_port: u16,
    pub reason: CloseReason,
    /// The session, already closed (its counters stay readable).
    pub session: Session,
    /// The worker's per-session I/O state.
    pub io: T,
}

/// Why a datagram was dropped without reaching a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// No valid guard prefix (`rx_guard_drops`).
    Guard,
    /// Client: not from `server.addr` (`rx_foreign`).
    Foreign,
    /// No session and none may be created (`rx_no_session`): a client with no session on that link and
    /// port, or a server datagram that decrypts but carries no KCP segment to learn a conv from.
    NoSession,
    /// Server: an unknown source's datagram decrypts but does not start a session (its first KCP segment
    /// is not a PUSH with sn = 0): a later datagram of some session (`rx_no_session`).
    NotSessionStart,
    /// Server: a session start whose conv was already used by a session: a replay (`rx_replay_drops`).
    Replay,
    /// An unknown source's datagram failed the crypto check: wrong key or block (`rx_crypto_failures`).
    Crypto,
    /// Server: a new session refused by `max_sessions` (`sessions_rejected`).
    SessionLimit,
    /// Server: the new session rejected its first datagram (`rx_session_errors`).
    FirstDatagramRejected,
}

/// What [`Endpoint::handle`] decided.
pub enum DatagramEvent<T> {
    /// Session `id` took the datagram: `accepted` when it authenticated and KCP took it, false for a
    /// per-datagram error (counted; the session lives on). Flush the session.
    Input { id: SessionId, accepted: bool },
    /// Server: a new session was learned from this datagram (which it took). Flush it.
    Opened(SessionId),
    /// A session was closed (the datagram is consumed). Boxed: rare, and a session is large.
    Closed(Box<Closed<T>>),
    /// The datagram was dropped.
    Dropped(DropReason),
}

/// One worker's sessions and their admission. See the module docs.
pub struct Endpoint<T> {
    role: Role,
    session_cfg: SessionConfig,
    server_addr: Option<SocketAddr>,
    more_servers: Vec<SocketAddr>,
    limits: Limits,
    guard: Option<Guard>,
    /// Server: decrypts a copy of an unknown source's first datagram to learn its conv.
    probe: Crypto,
    /// Server: the convs already used by sessions.
    replay: Option<Arc<dyn ReplayGate>>,
    scratch: Vec<u8>,
    sessions: SessionTable<T>,
    /// (link, local port, peer) → session.
    by_peer: HashMap<(u64, u16, SocketAddr), SessionId>,
    next_id: SessionId,
    /// Registered streams of all sessions.
    streams_total: usize,
    /// Proxied streams of all sessions (`max_streams_total`).
    data_streams_total: usize,
    bad_sources: HashMap<SocketAddr, u64>,
    stats: EndpointStats,
}

impl<T: Default> Endpoint<T> {
    /// An empty endpoint. Fails when the session settings cannot make a session (FEC shard counts).
    pub fn new(cfg: EndpointConfig) -> Result<Self, SessionConfigError> {
        cfg.session.validate()?;
        let replay = match (cfg.role, cfg.replay) {
            (Role::Server, Some(r)) => Some(r),
            (Role::Server, None) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let r: Arc<dyn ReplayGate> =
                    crate::proto::replay::in_memory(DEFAULT_HORIZON_SECS, now);
                Some(r)
            }
            (Role::Client, _) => None,
        };
        Ok(Endpoint {
            replay,
            role: cfg.role,
            probe: cfg.session.crypto.clone(),
            session_cfg: cfg.session,
            server_addr: cfg.server_addr,
            more_servers: cfg.more_servers,
            limits: cfg.limits,
            guard: cfg.guard,
            scratch: Vec::with_capacity(2048),
            sessions: HashMap::default(),
            by_peer: HashMap::default(),
            next_id: 1,
            streams_total: 0,
            data_streams_total: 0,
            bad_sources: HashMap::default(),
            stats: EndpointStats::default(),
        })
    }

    /// Processes one received datagram: `payload` is the envelope's TCP payload (guard prefix included
    /// when the guard is on), received on `link` for local TCP port `local_port` from `src`. It is
    /// decrypted in place. `now` is the sessions' ms clock, `unix_secs` the guard's clock.
    /// The local address is taken as unspecified: with `guard_bind = "4tuple"` use [`Endpoint::handle_at`].
    pub fn handle(
        &mut self,
        now: u32,
        unix_secs: u64,
        link: u64,
        local_port: u16,
        src: SocketAddr,
        payload: &mut [u8],
    ) -> DatagramEvent<T> {
        let local = match src {
            SocketAddr::V4(_) => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, local_port)),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, local_port)),
        };
        self.handle_at(now, unix_secs, link, local, src, payload)
    }

    /// [`Endpoint::handle`] with the packet's destination address `dst` as received (its port is the
    /// local port): the guard tag may bind it.
    pub fn handle_at(
        &mut self,
        now: u32,
        unix_secs: u64,
        link: u64,
        dst: SocketAddr,
        src: SocketAddr,
        payload: &mut [u8],
    ) -> DatagramEvent<T> {
        let local_port = dst.port();
        let mut payload = payload;
        if let Some(g) = self.guard.as_mut() {
            let at = Addressing {
                src,
                dst,
                to_server: self.role == Role::Server,
            };
            if !g.check(unix_secs, &at, payload) {
                self.stats.rx_guard_drops += 1;
                self.note_bad_source(src);
                trace!(%src, "guard check failed");
                return DatagramEvent::Dropped(DropReason::Guard);
            }
            let n = g.prefix_len();
            payload = &mut payload[n..];
        }
        if self.role == Role::Client
            && self.server_addr != Some(src)
            && !self.more_servers.contains(&src)
        {
            self.stats.rx_foreign += 1;
            return DatagramEvent::Dropped(DropReason::Foreign);
        }
        match self.by_peer.get(&(link, local_port, src)).copied() {
            Some(id) => self.input_existing(id, payload, now, unix_secs),
            None if self.role == Role::Server => {
                self.accept_new(link, local_port, src, payload, now, unix_secs)
            }
            None => {
                self.stats.rx_no_session += 1;
                DatagramEvent::Dropped(DropReason::NoSession)
            }
        }
    }

    fn input_existing(
        &mut self,
        id: SessionId,
        payload: &mut [u8],
        now: u32,
        unix_secs: u64,
    ) -> DatagramEvent<T> {
        let role = self.role;
        let Some(e) = self.sessions.get_mut(&id) else {
            // by_peer and the table change together; a stale index entry only drops the datagram.
            self.stats.rx_no_session += 1;
            return DatagramEvent::Dropped(DropReason::NoSession);
        };
        let accepted = match e.session.handle_datagram(now, payload) {
            Ok(()) => {
                e.last_rx = Some(now);
                true
            }
            Err(SessionError::Kcp(err)) => {
                self.stats.rx_session_errors += 1;
                // A new conversation from the same source (client restarted with the same port)?
                let conv = e.session.conv();
                let peer = e.peer;
                if role == Role::Server {
                    if let Some((c, cmd, sn)) = self.plain_first_segment(payload) {
                        if c != conv && sn == 0 && cmd == CMD_PUSH && self.conv_seen(c, unix_secs) {
                            self.stats.rx_replay_drops += 1;
                            debug!(%peer, old = conv, new = c, "session start with a conv already used: replay refused, session kept");
                            return DatagramEvent::Input {
                                id,
                                accepted: false,
                            };
                        }
                        if c != conv && sn == 0 && cmd == CMD_PUSH {
                            info!(%peer, old = conv, new = c, "new conversation from the same source: replacing session");
                            self.stats.sessions_replaced += 1;
                            // The datagram is consumed (decrypted in place); KCP retransmits it to the new
                            // session.
                            return self.closed_event(id, CloseReason::Replaced);
                        }
                    }
                }
                trace!(conv, error = %err, "datagram rejected by KCP");
                false
            }
            Err(SessionError::Dead) => return self.closed_event(id, CloseReason::Dead),
            Err(SessionError::Crypto(err)) => {
                self.stats.rx_crypto_failures += 1;
                trace!(error = %err, "datagram failed the crypto check");
                false
            }
            Err(err) => {
                self.stats.rx_session_errors += 1;
                trace!(error = %err, reason = err.reason(), "datagram rejected");
                if e.session.is_dead() {
                    return self.closed_event(id, CloseReason::Failed(err));
                }
                false
            }
        };
        DatagramEvent::Input { id, accepted }
    }

    fn closed_event(&mut self, id: SessionId, reason: CloseReason) -> DatagramEvent<T> {
        match self.close(id, reason) {
            Some(c) => DatagramEvent::Closed(Box::new(c)),
            None => DatagramEvent::Dropped(DropReason::NoSession),
        }
    }

    /// True if `conv` was already used by a session (server; a client has no filter).
    fn conv_seen(&self, conv: u32, unix_secs: u64) -> bool {
        self.replay
            .as_ref()
            .is_some_and(|r| r.seen(conv, unix_secs))
    }

    /// conv, cmd and sn of the first KCP segment of a datagram already decrypted in place.
    fn plain_first_segment(&self, pkt: &[u8]) -> Option<(u32, u8, u32)> {
        let h = self.session_cfg.crypto.header_len();
        let t = self.session_cfg.crypto.trailer_len();
        if pkt.len() < h + t {
            return None;
        }
        let body = &pkt[h..pkt.len() - t];
        let kcp = crate::wire::fec::kcp_bytes(body, self.session_cfg.fec_enabled())?;
        first_segment(kcp)
    }

    /// Server: an unknown source. Learn its conv from a decrypted copy and open a session.
    fn accept_new(
        &mut self,
        link: u64,
        local_port: u16,
        src: SocketAddr,
        payload: &mut [u8],
        now: u32,
        unix_secs: u64,
    ) -> DatagramEvent<T> {
        if let Some(max) = self.limits.max_sessions {
            if self.sessions.len() >= max {
                self.stats.sessions_rejected += 1;
                self.stats.limit_refusals[LimitKey::MaxSessions.index()] += 1;
                debug!(%src, max, "new session refused: max_sessions reached");
                return DatagramEvent::Dropped(DropReason::SessionLimit);
            }
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let conv = match self.probe.open(&mut self.scratch) {
            Ok(range) => {
                let fec = self.session_cfg.fec_enabled();
                match crate::wire::fec::kcp_bytes(&self.scratch[range], fec).and_then(first_segment)
                {
                    Some((conv, CMD_PUSH, 0)) => conv,
                    Some((conv, cmd, sn)) => {
                        // A later datagram of some session (after a server restart, or recorded and
                        // replayed): never a reason to open a session or to answer.
                        self.stats.rx_no_session += 1;
                        trace!(%src, conv, cmd, sn, "datagram from an unknown source does not start a session");
                        return DatagramEvent::Dropped(DropReason::NotSessionStart);
                    }
                    None => {
                        self.stats.rx_no_session += 1;
                        return DatagramEvent::Dropped(DropReason::NoSession);
                    }
                }
            }
            Err(err) => {
                self.stats.rx_crypto_failures += 1;
                self.note_bad_source(src);
                trace!(%src, error = %err, "datagram from an unknown source failed the crypto check");
                return DatagramEvent::Dropped(DropReason::Crypto);
            }
        };
        if self.conv_seen(conv, unix_secs) {
            self.stats.rx_replay_drops += 1;
            debug!(%src, conv, "session start with a conv already used: replay refused");
            return DatagramEvent::Dropped(DropReason::Replay);
        }
        let rejected = |stats: &mut EndpointStats, err: &dyn fmt::Display| {
            stats.rx_session_errors += 1;
            debug!(%src, conv, error = %err, "first datagram of a new session rejected");
            DatagramEvent::Dropped(DropReason::FirstDatagramRejected)
        };
        // The settings were validated by `Endpoint::new`: building the session does not fail.
        let mut session = match Session::new(Role::Server, conv, &self.session_cfg, now) {
            Ok(s) => s,
            Err(err) => return rejected(&mut self.stats, &err),
        };
        if let Err(err) = session.handle_datagram(now, payload) {
            return rejected(&mut self.stats, &err);
        }
        // Check and record in one step: another worker may have admitted the same conv meanwhile.
        if let Some(r) = self.replay.as_ref() {
            if !r.admit(conv, unix_secs) {
                self.stats.rx_replay_drops += 1;
                debug!(%src, conv, "session start with a conv already used: replay refused");
                return DatagramEvent::Dropped(DropReason::Replay);
            }
        }
        info!(%src, conv, "new session");
        let id = self.insert(now, link, local_port, src, session, T::default());
        DatagramEvent::Opened(id)
    }

    /// Client: a session this side dials to `server` with conversation `conv`, on `link` with local port
    /// `local_port`. It counts as live once a datagram of the server authenticates.
    pub fn connect(
        &mut self,
        now: u32,
        link: u64,
        local_port: u16,
        server: SocketAddr,
        conv: u32,
        io: T,
    ) -> Result<SessionId, SessionConfigError> {
        let session = Session::new(Role::Client, conv, &self.session_cfg, now)?;
        Ok(self.insert(now, link, local_port, server, session, io))
    }

    /// Adds an already built session for `peer` on `link`/`local_port` (replacing the index entry of any
    /// other session there); returns its id. A server session counts as live at once (it exists because a
    /// datagram authenticated), a client's once the server answers.
    pub fn insert(
        &mut self,
        now: u32,
        link: u64,
        local_port: u16,
        peer: SocketAddr,
        session: Session,
        io: T,
    ) -> SessionId {
        let id = self.next_id;
        self.next_id += 1;
        self.sessions.insert(
            id,
            Entry {
                session,
                io,
                link,
                local_port,
                peer,
                last_rx: (self.role == Role::Server).then_some(now),
                streams: 0,
                data_streams: 0,
            },
        );
        self.by_peer.insert((link, local_port, peer), id);
        self.stats.sessions_opened += 1;
        id
    }
}

impl<T> Endpoint<T> {
    /// This endpoint's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The settings every session is built from.
    pub fn session_config(&self) -> &SessionConfig {
        &self.session_cfg
    }

    /// The session table.
    pub fn sessions(&self) -> &SessionTable<T> {
        &self.sessions
    }

    /// Every session, mutably (its peer/link/port stay the endpoint's).
    pub fn sessions_mut(&mut self) -> impl Iterator<Item = (SessionId, &mut Entry<T>)> {
        self.sessions.iter_mut().map(|(&id, e)| (id, e))
    }

    pub fn get(&self, id: SessionId) -> Option<&Entry<T>> {
        self.sessions.get(&id)
    }

    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Entry<T>> {
        self.sessions.get_mut(&id)
    }

    /// Number of sessions (live or still dialling).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Sessions that authenticated a datagram within the last `window_ms` before `now`.
    pub fn live_sessions(&self, now: u32, window_ms: u32) -> usize {
        self.sessions
            .values()
            .filter(|e| e.last_rx.is_some_and(|t| now.wrapping_sub(t) <= window_ms))
            .count()
    }

    /// True if a session uses local port `port` on link `link` towards `peer`.
    pub fn has_session_on(&self, link: u64, port: u16, peer: SocketAddr) -> bool {
        self.by_peer.contains_key(&(link, port, peer))
    }

    /// The session using local port `port` on link `link` towards `peer`, if any.
    pub fn session_on(&self, link: u64, port: u16, peer: SocketAddr) -> Option<SessionId> {
        self.by_peer.get(&(link, port, peer)).copied()
    }

    /// True if any session has `peer` as its peer.
    pub fn serves_peer(&self, peer: SocketAddr) -> bool {
        self.by_peer.keys().any(|(_, _, p)| *p == peer)
    }

    /// Removes session `id` (closing it) and hands back what the worker must clean up.
    pub fn close(&mut self, id: SessionId, reason: CloseReason) -> Option<Closed<T>> {
        let mut e = self.sessions.remove(&id)?;
        e.session.close();
        self.by_peer.remove(&(e.link, e.local_port, e.peer));
        self.streams_total = self.streams_total.saturating_sub(e.streams);
        self.data_streams_total = self.data_streams_total.saturating_sub(e.data_streams);
        self.stats.sessions_closed += 1;
        let why = reason.to_string();
        info!(peer = %e.peer, conv = e.session.conv(), streams = e.streams, reason = why.as_str(), "session closed");
        Some(Closed {
            id,
            peer: e.peer,
            link: e.link,
            local_port: e.local_port,
            reason,
            session: e.session,
            io: e.io,
        })
    }

    /// Records a datagram from `src` that failed the guard or crypto check with no session of its own.
    fn note_bad_source(&mut self, src: SocketAddr) {
        let n = self.bad_sources.len();
        if let Some(c) = self.bad_sources.get_mut(&src) {
            *c += 1;
        } else if n < MAX_BAD_SOURCES {
            self.bad_sources.insert(src, 1);
        }
    }

    /// Sources whose datagrams failed the guard (any source) or the crypto check (before any session of
    /// theirs existed), with their failure counts. Bounded by [`MAX_BAD_SOURCES`].
    pub fn bad_sources(&self) -> &BadSources {
        &self.bad_sources
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Registered streams of all sessions.
    pub fn stream_count(&self) -> usize {
        self.streams_total
    }

    /// A stream of session `id` is now held by a task (the worker registered it).
    pub fn stream_opened(&mut self, id: SessionId) {
        if let Some(e) = self.sessions.get_mut(&id) {
            e.streams += 1;
            self.streams_total += 1;
            self.stats.streams_opened += 1;
        }
    }

    /// A stream registered with [`Endpoint::stream_opened`] was released.
    pub fn stream_closed(&mut self, id: SessionId) {
        if let Some(e) = self.sessions.get_mut(&id) {
            e.streams = e.streams.saturating_sub(1);
            self.streams_total = self.streams_total.saturating_sub(1);
        }
    }

    /// The peer opened stream `sid` on session `id`; `accepting`: the worker has someone to hand it to.
    /// Only a server accepts streams, and proxied streams are limited once their header is read
    /// ([`Endpoint::admit_data_stream`]): here only a bound on streams of any kind, so a peer opening
    /// streams without headers cannot pile them up. On `Err` the stream is closed (FIN) and counted in
    /// `streams_rejected`; flush the session. `Err(Some(key))` names the limit that refused it. On `Ok`
    /// register it ([`Endpoint::stream_opened`]).
    pub fn admit_peer_stream(
        &mut self,
        id: SessionId,
        sid: u32,
        accepting: bool,
    ) -> Result<(), Option<LimitKey>> {
        let limits = self.limits;
        let total = self.streams_total;
        let Some(e) = self.sessions.get_mut(&id) else {
            return Err(None);
        };
        let over_session = limits
            .max_streams_per_session
            .is_some_and(|m| e.streams >= m.saturating_add(PENDING_STREAM_SLACK));
        let over_total = limits
            .max_streams_total
            .is_some_and(|m| total >= m.saturating_add(PENDING_STREAM_SLACK));
        // A client accepts server-opened streams only when it serves reverse forwards (`accepting`).
        if over_session || over_total || !accepting {
            e.session.close_stream(sid);
            self.stats.streams_rejected += 1;
            debug!(peer = %e.peer, sid, over_session, over_total, "stream rejected");
            let key = stream_limit_key(over_session, over_total);
            if let Some(k) = key {
                self.stats.limit_refusals[k.index()] += 1;
            }
            return Err(key);
        }
        Ok(())
    }

    /// Server: a stream's header asked for a proxied connection (PTCP/PUDP). Applies
    /// `max_streams_per_session` and `max_streams_total` to proxied streams only (the PTCPF and liveness
    /// streams upstream clients open around every connection are control traffic, not counted). Returns
    /// `Err(Some(key))` (and counts the rejection) when the limit `key` is reached, `Err(None)` when the
    /// session is gone; on `Ok` the caller must call [`Endpoint::end_data_stream`] when the stream ends.
    pub fn admit_data_stream(&mut self, id: SessionId) -> Result<(), Option<LimitKey>> {
        let limits = self.limits;
        let total = self.data_streams_total;
        let Some(e) = self.sessions.get_mut(&id) else {
            return Err(None);
        };
        let over_session = limits
            .max_streams_per_session
            .is_some_and(|m| e.data_streams >= m);
        let over_total = limits.max_streams_total.is_some_and(|m| total >= m);
        if over_session || over_total {
            self.stats.streams_rejected += 1;
            debug!(peer = %e.peer, over_session, over_total, "proxied stream rejected by a stream limit");
            let key = stream_limit_key(over_session, over_total);
            if let Some(k) = key {
                self.stats.limit_refusals[k.index()] += 1;
            }
            return Err(key);
        }
        e.data_streams += 1;
        self.data_streams_total += 1;
        Ok(())
    }

    /// The stream limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A proxied stream admitted by [`Endpoint::admit_data_stream`] ended. (When the session is gone,
    /// [`Endpoint::close`] already took its streams off the total.)
    pub fn end_data_stream(&mut self, id: SessionId) {
        if let Some(e) = self.sessions.get_mut(&id) {
            e.data_streams = e.data_streams.saturating_sub(1);
            self.data_streams_total = self.data_streams_total.saturating_sub(1);
        }
    }

    /// Proxied streams of all sessions.
    pub fn data_stream_count(&self) -> usize {
        self.data_streams_total
    }
}

/// The key of the stream limit that refused a stream (the session's own limit when both are reached).
fn stream_limit_key(over_session: bool, over_total: bool) -> Option<LimitKey> {
    if over_session {
        Some(LimitKey::MaxStreamsPerSession)
    } else if over_total {
        Some(LimitKey::MaxStreamsTotal)
    } else {
        None
    }
}

/// conv, cmd and sn of the first KCP segment of `kcp` (a routing peek), if it is one header long.
fn first_segment(kcp: &[u8]) -> Option<(u32, u8, u32)> {
    let (conv, sn) = crate::wire::kcp::peek_conv_sn(kcp)?;
    Some((conv, kcp[4], sn))
}

#[cfg(test)]
mod tests {
    //! The endpoint driven in memory: real datagrams made by client and server [`Session`]s, a simulated ms
    //! clock and unix clock, no runtime.
    use super::*;
    use crate::proto::guard::{GuardBind, GuardConfig, GUARD_LEN, GUARD_TAG_LEN};
    use crate::proto::kcp::{KcpConfig, KcpMode};
    use crate::proto::smux::{SmuxConfig, SmuxEvent};
    use crate::wire::crypt::BlockMode;

    const CLIENT: &str = "10.9.0.1:40000";
    const OTHER: &str = "10.9.0.3:40000";
    const SERVER: &str = "10.9.0.2:9999";
    const LINK: u64 = 1;
    const PORT: u16 = 9999;
    const UNIX: u64 = 1_800_000_000;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn session_cfg(key: u8, fec: (usize, usize)) -> SessionConfig {
        SessionConfig {
            crypto: Crypto::from_derived(BlockMode::Aes, &[key; 32]).expect("crypto"),
            dshard: fec.0,
            pshard: fec.1,
            kcp: KcpConfig::preset(KcpMode::Fast),
            smux: SmuxConfig::default(),
            mtu: 1350,
        }
    }

    fn guard() -> Guard {
        Guard::with_derived(GuardConfig::cookie(*b"PQT1", 30, 1), [9; 32])
    }

    fn tag_guard(bind: GuardBind) -> Guard {
        Guard::with_derived(GuardConfig::tag(bind), [9; 32])
    }

    fn endpoint(role: Role, limits: Limits, guard: Option<Guard>) -> Endpoint<()> {
        endpoint_with(role, limits, guard, session_cfg(0x42, (0, 0)))
    }

    fn endpoint_with(
        role: Role,
        limits: Limits,
        guard: Option<Guard>,
        session: SessionConfig,
    ) -> Endpoint<()> {
        Endpoint::new(EndpointConfig {
            role,
            session,
            server_addr: (role == Role::Client).then(|| addr(SERVER)),
            more_servers: Vec::new(),
            limits,
            guard,
            replay: None,
        })
        .expect("endpoint")
    }

    /// A client session with a PING stream and the datagrams its first flush sends.
    fn client(conv: u32, cfg: &SessionConfig, now: u32) -> (Session, Vec<Vec<u8>>) {
        let mut s = Session::new(Role::Client, conv, cfg, now).expect("session");
        let sid = s.open_stream().expect("stream");
        s.write(sid, &[0x50, 0x01, 0x01, 0x00, 0x00])
            .expect("write");
        let out = flush(&mut s, now);
        (s, out)
    }

    fn flush(s: &mut Session, now: u32) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        s.poll_transmit(now, &mut |d: &[u8]| out.push(d.to_vec()));
        out
    }

    /// conv and sn of the first KCP segment of a sealed datagram (decrypting a copy).
    fn conv_sn(cfg: &SessionConfig, d: &[u8]) -> (u32, u32) {
        let mut copy = d.to_vec();
        let r = cfg.crypto.open(&mut copy).expect("decrypts");
        let k = crate::wire::fec::kcp_bytes(&copy[r], cfg.fec_enabled()).expect("kcp");
        crate::wire::kcp::peek_conv_sn(k).expect("segment")
    }

    fn feed(ep: &mut Endpoint<()>, now: u32, src: &str, d: &[u8]) -> DatagramEvent<()> {
        let mut copy = d.to_vec();
        ep.handle(now, UNIX, LINK, PORT, addr(src), &mut copy)
    }

    fn opened(ev: DatagramEvent<()>) -> SessionId {
        match ev {
            DatagramEvent::Opened(id) => id,
            other => panic!("expected a new session, got {}", describe(&other)),
        }
    }

    fn describe(ev: &DatagramEvent<()>) -> String {
        match ev {
            DatagramEvent::Input { id, accepted } => format!("input to {id} (accepted {accepted})"),
            DatagramEvent::Opened(id) => format!("opened {id}"),
            DatagramEvent::Closed(c) => format!("closed {} ({})", c.id, c.reason),
            DatagramEvent::Dropped(r) => format!("dropped ({r:?})"),
        }
    }

    #[test]
    fn server_learns_a_session_from_its_first_datagram() {
        for fec in [(0, 0), (10, 3)] {
            let cfg = session_cfg(0x42, fec);
            let mut ep = endpoint_with(Role::Server, Limits::default(), None, cfg.clone());
            let (mut c, dgrams) = client(0x1111_1111, &cfg, 0);
            assert!(!dgrams.is_empty());
            let id = opened(feed(&mut ep, 5, CLIENT, &dgrams[0]));
            for d in &dgrams[1..] {
                // FEC parity and further data reach the session it opened.
                match feed(&mut ep, 5, CLIENT, d) {
                    DatagramEvent::Input { id: got, .. } => assert_eq!(got, id),
                    other => panic!("{fec:?}: {}", describe(&other)),
                }
            }
            let e = ep.get(id).expect("session");
            assert_eq!(e.session.conv(), 0x1111_1111, "{fec:?}");
            assert_eq!(
                (e.peer(), e.link(), e.local_port()),
                (addr(CLIENT), LINK, PORT)
            );
            assert_eq!(e.last_rx(), Some(5));
            assert_eq!(ep.len(), 1);
            assert_eq!(ep.live_sessions(10, 100), 1);
            assert!(ep.has_session_on(LINK, PORT, addr(CLIENT)));
            let st = ep.stats();
            assert_eq!(
                (st.sessions_opened, st.rx_no_session, st.rx_session_errors),
                (1, 0, 0)
            );
            // The learned session talks to the client: its stream and reply come through.
            let s = &mut ep.get_mut(id).unwrap().session;
            assert!(matches!(s.poll_event(), Some(SmuxEvent::Opened(3))));
            for mut d in flush(s, 20) {
                c.handle_datagram(30, &mut d)
                    .expect("the client takes the server's datagram");
            }
            // Same source, other local port: another session (its own 4-tuple).
            let (_, other) = client(0x2222_2222, &cfg, 40);
            let mut copy = other[0].clone();
            let ev = ep.handle(40, UNIX, LINK, PORT + 1, addr(CLIENT), &mut copy);
            assert_ne!(opened(ev), id);
            assert_eq!(ep.len(), 2);
        }
    }

    #[test]
    fn new_conv_with_sn_zero_from_the_same_source_replaces_the_session() {
        let cfg = session_cfg(0x42, (0, 0));
        let mut ep = endpoint(Role::Server, Limits::default(), None);
        let (mut a, first) = client(0xaaaa_aaaa, &cfg, 0);
        let id = opened(feed(&mut ep, 1, CLIENT, &first[0]));
        // A later datagram of the same conversation is plain input.
        let sid = a.open_stream().unwrap();
        a.write(sid, b"more").unwrap();
        let later = flush(&mut a, 50);
        assert_ne!(conv_sn(&cfg, &later[0]).1, 0, "a later datagram");
        assert!(matches!(
            feed(&mut ep, 50, CLIENT, &later[0]),
            DatagramEvent::Input { id: got, accepted: true } if got == id
        ));
        // Another conv whose first segment has sn != 0 (not a restarted client's first datagram): rejected
        // by the session's KCP, the session stays.
        let (mut b, _lost) = client(0xbbbb_bbbb, &cfg, 100);
        let sid = b.open_stream().unwrap();
        b.write(sid, b"late").unwrap();
        let b_later = flush(&mut b, 150);
        let (conv, sn) = conv_sn(&cfg, &b_later[0]);
        assert_eq!(conv, 0xbbbb_bbbb);
        assert_ne!(sn, 0);
        assert!(matches!(
            feed(&mut ep, 150, CLIENT, &b_later[0]),
            DatagramEvent::Input { id: got, accepted: false } if got == id
        ));
        assert_eq!(ep.stats().sessions_replaced, 0);
        assert_eq!(ep.stats().rx_session_errors, 1);
        assert_eq!(ep.len(), 1);
        // A new conv with sn 0 from the same source: the old session goes, the datagram is consumed.
        let (_c, restarted) = client(0xcccc_cccc, &cfg, 200);
        assert_eq!(conv_sn(&cfg, &restarted[0]), (0xcccc_cccc, 0));
        match feed(&mut ep, 200, CLIENT, &restarted[0]) {
            DatagramEvent::Closed(c) => {
                assert_eq!(c.id, id);
                assert_eq!(c.peer, addr(CLIENT));
                assert!(matches!(c.reason, CloseReason::Replaced));
                assert_eq!(c.reason.to_string(), "replaced by a new conversation");
                assert!(c.session.is_dead());
            }
            other => panic!("{}", describe(&other)),
        }
        assert!(ep.is_empty());
        assert!(!ep.has_session_on(LINK, PORT, addr(CLIENT)));
        // Its retransmission opens the new session.
        let new = opened(feed(&mut ep, 210, CLIENT, &restarted[0]));
        assert_eq!(ep.get(new).unwrap().session.conv(), 0xcccc_cccc);
        let st = ep.stats();
        assert_eq!(
            (st.sessions_replaced, st.sessions_opened, st.sessions_closed),
            (1, 2, 1)
        );
    }

    fn shared_endpoint(filter: &crate::proto::replay::SharedReplayFilter) -> Endpoint<()> {
        let r: Arc<dyn ReplayGate> = filter.clone();
        Endpoint::new(EndpointConfig {
            role: Role::Server,
            session: session_cfg(0x42, (0, 0)),
            server_addr: None,
            more_servers: Vec::new(),
            limits: Limits::default(),
            guard: None,
            replay: Some(r),
        })
        .expect("endpoint")
    }

    #[test]
    fn only_a_session_start_opens_a_session() {
        for fec in [(0, 0), (10, 3)] {
            let cfg = session_cfg(0x42, fec);
            let mut ep = endpoint_with(Role::Server, Limits::default(), None, cfg.clone());
            let (mut a, first) = client(0xa1a1_a1a1, &cfg, 0);
            let sid = a.open_stream().unwrap();
            a.write(sid, b"later").unwrap();
            let later = flush(&mut a, 50);
            assert_ne!(conv_sn(&cfg, &later[0]).1, 0);
            // A later datagram (sn != 0) from an unknown source, even the real client's: nothing opens.
            for src in [CLIENT, OTHER] {
                assert!(matches!(
                    feed(&mut ep, 60, src, &later[0]),
                    DatagramEvent::Dropped(DropReason::NotSessionStart)
                ));
            }
            assert!(ep.is_empty());
            assert_eq!(ep.stats().rx_no_session, 2);
            assert_eq!(ep.stats().sessions_opened, 0);
            // The first datagram (PUSH, sn 0) does.
            opened(feed(&mut ep, 70, CLIENT, &first[0]));
        }
    }

    #[test]
    fn a_seen_conv_never_opens_nor_replaces_a_session() {
        let cfg = session_cfg(0x42, (0, 0));
        let mut ep = endpoint(Role::Server, Limits::default(), None);
        let (_a, a) = client(0xaaaa_0001, &cfg, 0);
        let id = opened(feed(&mut ep, 1, CLIENT, &a[0]));
        // The real client's retransmission reaches its session.
        assert!(matches!(
            feed(&mut ep, 2, CLIENT, &a[0]),
            DatagramEvent::Input { id: got, .. } if got == id
        ));
        // Replayed from another address: refused, nothing opened.
        assert!(matches!(
            feed(&mut ep, 3, OTHER, &a[0]),
            DatagramEvent::Dropped(DropReason::Replay)
        ));
        assert_eq!(ep.len(), 1);
        // The session goes; its first datagram replayed from its own address opens nothing either.
        ep.close(id, CloseReason::Local("test".into())).unwrap();
        assert!(matches!(
            feed(&mut ep, 4, CLIENT, &a[0]),
            DatagramEvent::Dropped(DropReason::Replay)
        ));
        assert!(ep.is_empty());
        // A live session of a fresh conv from the same source; the old first datagram, spoofed from that
        // source, replaces nothing.
        let (_b, b) = client(0xbbbb_0002, &cfg, 10);
        let live = opened(feed(&mut ep, 10, CLIENT, &b[0]));
        assert!(matches!(
            feed(&mut ep, 11, CLIENT, &a[0]),
            DatagramEvent::Input { id: got, accepted: false } if got == live
        ));
        assert!(ep.has_session_on(LINK, PORT, addr(CLIENT)));
        let st = ep.stats();
        assert_eq!((st.rx_replay_drops, st.sessions_replaced), (3, 0));
        // A real client restart (a conv never seen) still replaces the session, and its retransmission
        // opens the new one.
        let (_c, c) = client(0xcccc_0003, &cfg, 20);
        match feed(&mut ep, 20, CLIENT, &c[0]) {
            DatagramEvent::Closed(closed) => {
                assert_eq!(closed.id, live);
                assert!(matches!(closed.reason, CloseReason::Replaced));
            }
            other => panic!("{}", describe(&other)),
        }
        let new = opened(feed(&mut ep, 21, CLIENT, &c[0]));
        assert_eq!(ep.get(new).unwrap().session.conv(), 0xcccc_0003);
        assert_eq!(ep.stats().sessions_replaced, 1);
    }

    #[test]
    fn workers_share_the_filter_and_it_survives_a_restart() {
        use crate::proto::replay::{BloomParams, ReplayFilter};
        let cfg = session_cfg(0x42, (0, 0));
        let filter = crate::proto::replay::in_memory(3600, UNIX);
        let (mut w0, mut w1) = (shared_endpoint(&filter), shared_endpoint(&filter));
        let (_a, a) = client(0x5eed_0001, &cfg, 0);
        opened(feed(&mut w0, 1, CLIENT, &a[0]));
        // The same datagram replayed to another worker (another source, another RX queue).
        assert!(matches!(
            feed(&mut w1, 2, OTHER, &a[0]),
            DatagramEvent::Dropped(DropReason::Replay)
        ));
        assert_eq!(w1.stats().rx_replay_drops, 1);
        // Persisted and loaded by a restarted daemon: still refused.
        let bytes = filter.lock().unwrap().encode();
        let loaded = ReplayFilter::decode(&bytes, BloomParams::DEFAULT, 3600, UNIX + 60).unwrap();
        let restarted = Arc::new(std::sync::Mutex::new(loaded));
        let mut ep = shared_endpoint(&restarted);
        assert!(matches!(
            feed(&mut ep, 1, OTHER, &a[0]),
            DatagramEvent::Dropped(DropReason::Replay)
        ));
        assert!(ep.is_empty());
    }

    #[test]
    fn a_client_endpoint_never_replaces_its_session() {
        let cfg = session_cfg(0x42, (0, 0));
        let mut ep = endpoint(Role::Client, Limits::default(), None);
        let id = ep
            .connect(0, LINK, 40000, addr(SERVER), 0x1234, ())
            .unwrap();
        // A server session of another conv sends its first datagram (sn 0) to our port.
        let mut other = Session::new(Role::Server, 0x9999, &cfg, 0).unwrap();
        let sid = other.open_stream().unwrap();
        other.write(sid, b"x").unwrap();
        let d = flush(&mut other, 1);
        assert_eq!(conv_sn(&cfg, &d[0]), (0x9999, 0));
        let mut copy = d[0].clone();
        let ev = ep.handle(2, UNIX, LINK, 40000, addr(SERVER), &mut copy);
        assert!(matches!(ev, DatagramEvent::Input { id: got, accepted: false } if got == id));
        assert_eq!(ep.len(), 1);
        assert_eq!(ep.stats().sessions_replaced, 0);
    }

    #[test]
    fn max_sessions_refuses_new_sources() {
        let cfg = session_cfg(0x42, (0, 0));
        let limits = Limits {
            max_sessions: Some(1),
            ..Limits::default()
        };
        let mut ep = endpoint(Role::Server, limits, None);
        let (_, a) = client(1, &cfg, 0);
        let id = opened(feed(&mut ep, 1, CLIENT, &a[0]));
        let (_, b) = client(2, &cfg, 0);
        assert!(matches!(
            feed(&mut ep, 2, OTHER, &b[0]),
            DatagramEvent::Dropped(DropReason::SessionLimit)
        ));
        assert_eq!(ep.stats().sessions_rejected, 1);
        assert_eq!(ep.stats().limit_refusals, [1, 0, 0, 0], "max_sessions");
        assert_eq!(ep.len(), 1);
        // The admitted source keeps working; once it is gone the other one gets in.
        assert!(matches!(
            feed(&mut ep, 3, CLIENT, &a[0]),
            DatagramEvent::Input { id: got, .. } if got == id
        ));
        ep.close(id, CloseReason::Local("test".into()))
            .expect("closed");
        opened(feed(&mut ep, 4, OTHER, &b[0]));
        let zero = Limits {
            max_sessions: Some(0),
            ..Limits::default()
        };
        let mut none = endpoint(Role::Server, zero, None);
        assert!(matches!(
            feed(&mut none, 1, CLIENT, &a[0]),
            DatagramEvent::Dropped(DropReason::SessionLimit)
        ));
        assert!(none.is_empty());
    }

    #[test]
    fn guard_refuses_missing_and_bad_prefixes() {
        let cfg = session_cfg(0x42, (0, 0));
        let mut ep = endpoint(Role::Server, Limits::default(), Some(guard()));
        let (_, d) = client(7, &cfg, 0);
        let prefixed = |unix: u64, d: &[u8]| {
            let mut p = vec![0u8; GUARD_LEN];
            guard().write_cookie(unix, &mut p);
            p.extend_from_slice(d);
            p
        };
        // No prefix at all.
        assert!(matches!(
            feed(&mut ep, 1, CLIENT, &d[0]),
            DatagramEvent::Dropped(DropReason::Guard)
        ));
        // A tampered cookie, a wrong magic, a prefix two windows old (skew 1).
        let mut bad = prefixed(UNIX, &d[0]);
        bad[GUARD_LEN - 1] ^= 1;
        let mut magic = prefixed(UNIX, &d[0]);
        magic[0] = b'X';
        for p in [bad, magic, prefixed(UNIX - 60, &d[0])] {
            assert!(matches!(
                feed(&mut ep, 2, CLIENT, &p),
                DatagramEvent::Dropped(DropReason::Guard)
            ));
        }
        assert_eq!(ep.stats().rx_guard_drops, 4);
        assert_eq!(ep.bad_sources().get(&addr(CLIENT)), Some(&4));
        assert!(ep.is_empty());
        assert_eq!(
            ep.stats().rx_crypto_failures,
            0,
            "dropped before decryption"
        );
        // A valid prefix (this window or the previous one) opens the session.
        opened(feed(&mut ep, 3, CLIENT, &prefixed(UNIX - 30, &d[0])));
        assert_eq!(ep.len(), 1);
    }

    #[test]
    fn guard_tag_is_checked_with_the_received_addressing() {
        let cfg = session_cfg(0x42, (0, 0));
        let (_, d) = client(7, &cfg, 0);
        let server_ip = addr(SERVER).ip();
        let dst = SocketAddr::new(server_ip, PORT);
        // What the client sends: the tag over the datagram's head, bound to the packet's addressing.
        let tagged = |bind: GuardBind, src: &str, d: &[u8]| {
            let at = Addressing {
                src: addr(src),
                dst,
                to_server: true,
            };
            let mut p = vec![0u8; GUARD_TAG_LEN];
            tag_guard(bind).write_prefix(0, &at, d, &mut p);
            p.extend_from_slice(d);
            p
        };
        for bind in [GuardBind::Port, GuardBind::FourTuple, GuardBind::None] {
            let mut ep = endpoint(Role::Server, Limits::default(), Some(tag_guard(bind)));
            // Sent from CLIENT, received from OTHER (a NAT rewrote the source, or a replay).
            let mut p = tagged(bind, CLIENT, &d[0]);
            let ev = ep.handle_at(1, UNIX, LINK, dst, addr(OTHER), &mut p);
            match bind {
                GuardBind::FourTuple => {
                    assert!(matches!(ev, DatagramEvent::Dropped(DropReason::Guard)));
                    assert_eq!(ep.stats().rx_crypto_failures, 0, "before decryption");
                }
                _ => {
                    opened(ev);
                }
            }
            // Bit flips in the tag or the covered head, and no tag at all.
            let mut flipped = tagged(bind, OTHER, &d[0]);
            flipped[3] ^= 1;
            let mut head = tagged(bind, OTHER, &d[0]);
            head[GUARD_TAG_LEN + 5] ^= 1;
            for mut p in [flipped, head, d[0].to_vec()] {
                assert!(matches!(
                    ep.handle_at(2, UNIX, LINK, dst, addr(CLIENT), &mut p),
                    DatagramEvent::Dropped(DropReason::Guard)
                ));
            }
            // From the right source it passes the guard, whatever the time: 4tuple opens the session;
            // with port/none the replay from OTHER already used the conv, so the replay filter refuses it.
            let mut p = tagged(bind, CLIENT, &d[0]);
            let ev = ep.handle_at(3, UNIX + 100_000, LINK, dst, addr(CLIENT), &mut p);
            let ok = match bind {
                GuardBind::FourTuple => matches!(ev, DatagramEvent::Opened(_)),
                _ => matches!(ev, DatagramEvent::Dropped(DropReason::Replay)),
            };
            assert!(ok, "{bind:?}: {}", describe(&ev));
        }
    }

    #[test]
    fn wrong_key_is_a_crypto_failure_and_opens_nothing() {
        let mut ep = endpoint(Role::Server, Limits::default(), None);
        let (_, d) = client(7, &session_cfg(0x43, (0, 0)), 0);
        for now in 1..=3 {
            assert!(matches!(
                feed(&mut ep, now, OTHER, &d[0]),
                DatagramEvent::Dropped(DropReason::Crypto)
            ));
        }
        assert!(ep.is_empty());
        assert_eq!(ep.stats().rx_crypto_failures, 3);
        assert_eq!(ep.stats().sessions_opened, 0);
        assert_eq!(ep.bad_sources().get(&addr(OTHER)), Some(&3));
        // A wrong-key datagram on an existing session's 4-tuple is counted, the session stays, and its
        // source is not "bad" (it has a session).
        let (_, good) = client(8, &session_cfg(0x42, (0, 0)), 0);
        let id = opened(feed(&mut ep, 4, CLIENT, &good[0]));
        assert!(matches!(
            feed(&mut ep, 5, CLIENT, &d[0]),
            DatagramEvent::Input { id: got, accepted: false } if got == id
        ));
        assert_eq!(ep.stats().rx_crypto_failures, 4);
        assert_eq!(ep.get(id).unwrap().last_rx(), Some(4));
        assert!(!ep.bad_sources().contains_key(&addr(CLIENT)));
    }

    #[test]
    fn client_drops_foreign_sources_and_unknown_ports() {
        let cfg = session_cfg(0x42, (0, 0));
        let mut ep = endpoint(Role::Client, Limits::default(), None);
        let local = 40000;
        let id = ep
            .connect(0, LINK, local, addr(SERVER), 0x5151, ())
            .unwrap();
        assert_eq!(
            ep.get(id).unwrap().last_rx(),
            None,
            "a dialled session has heard nothing"
        );
        assert_eq!(ep.live_sessions(0, 1000), 0);
        // The server's answer to the client's first flush.
        let mut server = Session::new(Role::Server, 0x5151, &cfg, 0).unwrap();
        let c = &mut ep.get_mut(id).unwrap().session;
        let sid = c.open_stream().unwrap();
        c.write(sid, b"hi").unwrap();
        for mut d in flush(c, 1) {
            server.handle_datagram(2, &mut d).unwrap();
        }
        let reply = flush(&mut server, 3);
        assert!(!reply.is_empty());
        let mut copy = reply[0].clone();
        let ev = ep.handle(4, UNIX, LINK, local, addr(OTHER), &mut copy);
        assert!(matches!(ev, DatagramEvent::Dropped(DropReason::Foreign)));
        let mut copy = reply[0].clone();
        let ev = ep.handle(4, UNIX, LINK, local + 1, addr(SERVER), &mut copy);
        assert!(matches!(ev, DatagramEvent::Dropped(DropReason::NoSession)));
        let mut copy = reply[0].clone();
        let ev = ep.handle(5, UNIX, LINK, local, addr(SERVER), &mut copy);
        assert!(matches!(ev, DatagramEvent::Input { id: got, accepted: true } if got == id));
        let st = ep.stats();
        assert_eq!((st.rx_foreign, st.rx_no_session), (1, 1));
        assert_eq!(ep.get(id).unwrap().last_rx(), Some(5));
        assert_eq!(ep.live_sessions(6, 1000), 1);
        assert_eq!(
            ep.live_sessions(2000, 1000),
            0,
            "silent for longer than the window"
        );
        assert!(ep.bad_sources().is_empty());
        // A client accepts peer-opened streams only when it serves reverse forwards (`accepting`).
        assert_eq!(ep.admit_peer_stream(id, 2, false), Err(None));
        assert_eq!(ep.stats().streams_rejected, 1);
        assert_eq!(
            ep.stats().limit_refusals,
            [0; LimitKey::COUNT],
            "not a limit"
        );
        assert_eq!(ep.admit_peer_stream(id, 4, true), Ok(()));
    }

    #[test]
    fn stream_limits_count_proxied_and_pending_streams() {
        let cfg = session_cfg(0x42, (0, 0));
        let limits = Limits {
            max_sessions: None,
            max_streams_total: Some(2),
            max_streams_per_session: Some(1),
        };
        let mut ep = endpoint(Role::Server, limits, None);
        let (_, a) = client(1, &cfg, 0);
        let (_, b) = client(2, &cfg, 0);
        let (_, c) = client(3, &cfg, 0);
        let a = opened(feed(&mut ep, 1, CLIENT, &a[0]));
        let b = opened(feed(&mut ep, 1, OTHER, &b[0]));
        let c = opened(feed(&mut ep, 1, "10.9.0.4:1", &c[0]));
        let per = Err(Some(LimitKey::MaxStreamsPerSession));
        let total = Err(Some(LimitKey::MaxStreamsTotal));
        assert_eq!(ep.admit_data_stream(a), Ok(()));
        assert_eq!(ep.admit_data_stream(a), per, "max_streams_per_session 1");
        assert_eq!(ep.admit_data_stream(b), Ok(()));
        assert_eq!(ep.admit_data_stream(c), total, "max_streams_total 2");
        assert_eq!(ep.stats().streams_rejected, 2);
        assert_eq!(ep.stats().limit_refusals, [0, 1, 1, 0], "one per key");
        assert_eq!(ep.data_stream_count(), 2);
        ep.end_data_stream(a);
        assert_eq!(ep.admit_data_stream(c), Ok(()), "a's stream ended");
        // Closing a session takes its proxied streams off the total.
        ep.close(b, CloseReason::Dead).unwrap();
        assert_eq!(ep.data_stream_count(), 1);
        assert_eq!(ep.admit_data_stream(a), Ok(()));
        assert_eq!(ep.admit_data_stream(999), Err(None), "no such session");
        // Streams the peer opens: a bound of the limit plus PENDING_STREAM_SLACK, only when accepting.
        assert_eq!(ep.admit_peer_stream(a, 1, false), Err(None));
        for sid in 0..(1 + PENDING_STREAM_SLACK) as u32 {
            assert_eq!(
                ep.admit_peer_stream(a, 2 * sid + 1, true),
                Ok(()),
                "stream {sid}"
            );
            ep.stream_opened(a);
        }
        let rejected = ep.stats().streams_rejected;
        assert_eq!(
            ep.admit_peer_stream(a, 999, true),
            per,
            "per-session bound: 1 + slack"
        );
        assert_eq!(ep.admit_peer_stream(c, 1, true), Ok(()));
        ep.stream_opened(c);
        assert_eq!(
            ep.admit_peer_stream(c, 3, true),
            total,
            "total bound: 2 + slack"
        );
        assert_eq!(ep.stats().streams_rejected, rejected + 2);
        assert_eq!(ep.stats().limit_refusals, [0, 2, 2, 0]);
        assert_eq!(ep.stream_count(), 2 + PENDING_STREAM_SLACK);
        assert_eq!(ep.get(a).unwrap().streams(), 1 + PENDING_STREAM_SLACK);
        ep.stream_closed(a);
        assert_eq!(ep.stream_count(), 1 + PENDING_STREAM_SLACK);
        assert_eq!(ep.admit_peer_stream(a, 1001, true), Ok(()), "room again");
        assert_eq!(ep.stats().streams_opened, 2 + PENDING_STREAM_SLACK as u64);
        ep.close(a, CloseReason::Local("test".into())).unwrap();
        assert_eq!(ep.stream_count(), 1, "c's stream");
    }

    #[test]
    fn bad_fec_counts_refuse_the_endpoint() {
        let r = Endpoint::<()>::new(EndpointConfig {
            role: Role::Server,
            session: session_cfg(0x42, (200, 100)),
            server_addr: None,
            more_servers: Vec::new(),
            limits: Limits::default(),
            guard: None,
            replay: None,
        });
        let err = r.err().expect("refused");
        assert!(
            err.to_string().contains("transport.kcp.dshard = 200"),
            "{err}"
        );
    }
}
