//! Shared worker state: links (packet-I/O backends), the sessions' endpoint, timers and counters.
//!
//! The sessions themselves, the demultiplexing of received datagrams to them, conv learning, session
//! replacement, the guard check and the limits are the sans-IO [`Endpoint`]'s
//! ([`crate::proto::endpoint`]); the core does the I/O around it: it parses envelopes, hands frames of
//! other workers' sessions to their owner (XDP mode), feeds each TCP payload to the endpoint and acts on
//! its decision (flush the session, wake the streams of a closed one, re-dial on a client), sends what the
//! sessions emit and turns their smux events into task wake-ups.
//!
//! Everything lives in one `Rc<RefCell<Core>>` owned by the worker thread. Tasks borrow it briefly and never
//! across an `.await`. The RX task of each link drains its backend in batches ([`Core::rx_link`]); the driver
//! task ([`drive`]) runs session timers and flushes sessions that stream tasks touched ("dirty"); every
//! [`CC_REFRESH_MS`] it also gathers the sessions' congestion-control figures for the metrics publisher
//! ([`Core::refresh_cc`], off the per-packet path).
use std::cell::RefCell;
/// The worker's maps are looked up per frame: foldhash (randomly seeded per process) instead of SipHash,
/// which showed up at ~10 % of a receiving worker's CPU.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, trace, warn};

use super::client::ClientState;
use super::WorkerConfig;
use crate::io::PacketIo;
use crate::ops::metrics::{window_limited_index, CcSnapshot};
use crate::proto::cc::CcStats;
use crate::proto::endpoint::{
    BadSources, CloseReason, Closed, DatagramEvent, DropReason, Endpoint, EndpointConfig,
    SessionTable,
};
use crate::proto::guard::{Addressing, Guard};
use crate::proto::limits::{LimitCounts, LimitKey};
use crate::proto::session::{Role, SessionConfigError};
use crate::proto::smux::SmuxEvent;
use crate::wire::envelope::{parse_frame_on, EnvelopeBuilder, FlagCycler, Medium, TcpFlags};

/// The worker's shared state handle.
pub type Shared = Rc<RefCell<Core>>;

/// Longest the driver sleeps without a deadline (keeps the clock moving for keepalives).
const MAX_IDLE_WAIT: Duration = Duration::from_millis(1000);

/// Longest the driver sleeps with the noise wire (handshake retries, cookie replies, key expiry).
const NOISE_TICK_MS: u32 = 250;

/// How often the driver gathers the sessions' congestion-control figures into [`DaemonStats::cc`] (the
/// metrics publishing interval).
pub const CC_REFRESH_MS: u32 = crate::ops::hub::PUBLISH_INTERVAL_MS as u32;

/// Daemon-level counters (summed into metrics by whoever exports them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DaemonStats {
    pub rx_frames: u64,
    /// Frames the envelope parser rejected (not Ethernet/IP/TCP, wrong port, empty payload ...).
    pub rx_bad_envelope: u64,
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
    /// Server: session starts refused because their conv was already used (replays).
    pub rx_replay_drops: u64,
    pub tx_datagrams: u64,
    pub tx_errors: u64,
    pub sessions_opened: u64,
    pub sessions_closed: u64,
    /// Server: new sessions refused by `max_sessions`.
    pub sessions_rejected: u64,
    /// Server: sessions replaced by a new conv from the same source (spec §3.5).
    pub sessions_replaced: u64,
    pub streams_opened: u64,
    /// Server: streams closed at once by `max_streams_*`.
    pub streams_rejected: u64,
    /// Server: sessions and streams refused (or, `header_timeout`, closed), per limit key
    /// ([`LimitKey::index`]).
    pub limit_refusals: LimitCounts,
    /// XDP mode: frames that landed on this worker's queue but belong to another worker's session
    /// (handed to the owner through its mailbox).
    pub rx_cross_worker: u64,
    /// XDP mode: frames that could not be handed to their owner (its mailbox was full).
    pub rx_handoff_drops: u64,
    /// XDP mode: frames this worker received from other workers' queues.
    pub rx_handed_in: u64,
    /// Congestion-control figures of the live sessions (plus cumulative counters of the gone ones), as
    /// of the driver's last [`Core::refresh_cc`] (at most [`CC_REFRESH_MS`] old while the worker runs).
    pub cc: CcSnapshot,
    /// The noise wire's counters (zero without it).
    pub noise: super::noise::NoiseStats,
}

/// Wakers of one stream's reader and writer.
#[derive(Default)]
pub(crate) struct StreamSlot {
    pub read: Option<Waker>,
    pub write: Option<Waker>,
}

impl StreamSlot {
    fn wake_all(&mut self) {
        if let Some(w) = self.read.take() {
            w.wake();
        }
        if let Some(w) = self.write.take() {
            w.wake();
        }
    }
}

/// The worker's I/O state of one session, carried in the endpoint's session table
/// ([`Entry::io`](crate::proto::endpoint::Entry)).
#[derive(Default)]
pub(crate) struct SessionIo {
    /// Envelope of a session on a shared link whose source port differs from the link's (client sessions
    /// of an XDP worker); `None` = use the link's builders.
    pub env: Option<EnvelopeBuilder>,
    /// Wakers of the streams tasks hold on the session.
    pub streams: HashMap<u32, StreamSlot>,
    pub dirty: bool,
    pub deadline: u32,
    /// The "held below the BDP by a window" warning was logged for this session (once per session).
    pub cc_window_warned: bool,
}

/// One packet-I/O backend (a "socket" in upstream's terms) with its envelope builders.
pub(crate) struct Link {
    pub io: Box<dyn PacketIo>,
    /// Local TCP port the link captures; 0 = any port (a shared link: frames are dispatched by their
    /// destination port).
    pub port: u16,
    /// Carries many sessions (an AF_XDP queue socket): a session dying does not retire it.
    pub shared: bool,
    pub env4: Option<EnvelopeBuilder>,
    pub env6: Option<EnvelopeBuilder>,
    /// Signalled when the link must stop (its RX task then removes it).
    pub retire: Rc<Notify>,
}

/// The [`DaemonStats`] counters the worker itself keeps (the endpoint keeps the others).
#[derive(Clone, Copy, Debug, Default)]
struct IoCounters {
    rx_frames: u64,
    rx_bad_envelope: u64,
    tx_datagrams: u64,
    tx_errors: u64,
    rx_cross_worker: u64,
    rx_handoff_drops: u64,
    rx_handed_in: u64,
    /// Server: streams closed because no paqet header came within `header_timeout`.
    header_timeouts: u64,
}

/// The worker's state. See the module docs.
pub struct Core {
    pub(crate) cfg: Rc<WorkerConfig>,
    start: Instant,
    pub(crate) links: HashMap<u64, Link>,
    next_link: u64,
    /// Sessions, demultiplexing, session and stream admission, guard check (sans-IO).
    pub(crate) endpoint: Endpoint<SessionIo>,
    dirty: Vec<u64>,
    pub(crate) notify: Rc<Notify>,
    /// Server: flag lists clients sent with PTCPF, keyed by client address.
    pub(crate) peer_flags: HashMap<SocketAddr, FlagCycler>,
    local_flags: FlagCycler,
    /// The guard that writes the prefix of sent datagrams (a copy of the endpoint's, which checks them).
    tx_guard: Option<Guard>,
    rx_arena: Vec<u8>,
    rx_frames: Vec<(usize, usize)>,
    /// Server: streams the peer opened, handed to the accept task.
    accept_tx: Option<mpsc::UnboundedSender<(u64, u32)>>,
    pub(crate) client: ClientState,
    /// XDP mode: where frames of other workers' sessions go.
    pub(crate) router: Option<super::xdp::Router>,
    counters: IoCounters,
    /// Congestion-control figures as of the last [`Core::refresh_cc`].
    cc: CcSnapshot,
    /// When [`Core::refresh_cc`] last ran (worker ms clock).
    cc_refreshed: Option<u32>,
    /// Cumulative congestion-control counters of sessions that are gone.
    cc_retired: CcRetired,
    /// Sessions that became window-limited, by [`WINDOW_LIMITED_BY`](crate::ops::metrics::WINDOW_LIMITED_BY).
    cc_window_limited_total: [u64; 2],
    /// The authenticated noise wire (`transport.kcp.block = "noise"`); `None`: kcp-go's crypto.
    pub(crate) noise: Option<super::noise::NoiseWire>,
}

/// Cumulative [`CcStats`] counters of the sessions a worker dropped (keeps the exported counters
/// monotonic when sessions go).
#[derive(Clone, Copy, Debug, Default)]
struct CcRetired {
    bytes_sent: u64,
    bytes_delivered: u64,
    spurious_retrans: u64,
}

/// The once-per-session "window-limited" check: when `s` says a window keeps the sender below the path's
/// bandwidth-delay product and `warned` is not set yet, sets it, counts the session in `totals` (by
/// [`WINDOW_LIMITED_BY`](crate::ops::metrics::WINDOW_LIMITED_BY)) and returns the warning to log.
pub(crate) fn window_limited_warning(
    peer: SocketAddr,
    conv: u32,
    s: &CcStats,
    warned: &mut bool,
    totals: &mut [u64; 2],
) -> Option<String> {
    let by = s.window_limited_by?;
    if *warned {
        return None;
    }
    *warned = true;
    if let Some(i) = window_limited_index(by) {
        totals[i] += 1;
    }
    let bdp = s.bdp_segments;
    let msg = match by {
        "sndwnd" => format!(
            "session {peer} (conv {conv:08x}): our send window transport.kcp.sndwnd = {} segments keeps the \
             sender below the path's bandwidth-delay product ({bdp} segments); set transport.kcp.sndwnd = \
             \"auto\" or at least {bdp}",
            s.sndwnd
        ),
        _ => format!(
            "session {peer} (conv {conv:08x}): the peer's receive window ({} segments advertised) keeps the \
             sender below the path's bandwidth-delay product ({bdp} segments); set transport.kcp.rcvwnd = \
             \"auto\" or at least {bdp} on the peer",
            s.rmt_wnd
        ),
    };
    Some(msg)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `a` is at or before `b` on the wrapping u32 millisecond clock.
fn due(deadline: u32, now: u32) -> bool {
    (now.wrapping_sub(deadline) as i32) >= 0
}

impl Core {
    /// A new, empty core. `local_flags` must be non-empty (the config guarantees it; `["PA"]` otherwise).
    /// Fails when the session settings cannot make a session (FEC shard counts).
    pub fn new(cfg: WorkerConfig) -> Result<Shared, SessionConfigError> {
        let local_flags = FlagCycler::new(cfg.local_flags.clone()).unwrap_or_else(|_| {
            FlagCycler::new(vec![TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0)]).expect("one entry")
        });
        let guard = cfg
            .guard
            .as_ref()
            .map(|(g, key)| Guard::new(g.clone(), key));
        // With the noise wire, the guard prefix is checked (and stripped) before the noise layer; the
        // endpoint then sees bare KCP bodies.
        let noise = cfg
            .noise
            .clone()
            .map(|n| super::noise::NoiseWire::new(n, guard.clone()));
        let endpoint = Endpoint::new(EndpointConfig {
            role: cfg.role,
            session: cfg.session.clone(),
            server_addr: cfg.server_addr,
            more_servers: cfg.servers.iter().map(|s| s.addr).collect(),
            limits: cfg.limits,
            guard: if noise.is_some() { None } else { guard.clone() },
            replay: cfg.replay.clone(),
        })?;
        let conn = cfg.conn.max(1);
        let servers = cfg.server_targets();
        Ok(Rc::new(RefCell::new(Core {
            cfg: Rc::new(cfg),
            start: Instant::now(),
            links: HashMap::default(),
            next_link: 1,
            endpoint,
            dirty: Vec::new(),
            notify: Rc::new(Notify::new()),
            peer_flags: HashMap::default(),
            local_flags,
            tx_guard: guard,
            rx_arena: Vec::with_capacity(64 * 2048),
            rx_frames: Vec::with_capacity(64),
            accept_tx: None,
            client: ClientState::new(conn, servers),
            router: None,
            counters: IoCounters::default(),
            cc: CcSnapshot::default(),
            cc_refreshed: None,
            cc_retired: CcRetired::default(),
            cc_window_limited_total: [0; 2],
            noise,
        })))
    }

    /// The worker clock: milliseconds since the worker started (wrapping u32).
    pub fn now(&self) -> u32 {
        self.start.elapsed().as_millis() as u32
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    /// The daemon counters: the worker's I/O counters and the endpoint's decisions.
    pub fn stats(&self) -> DaemonStats {
        let io = self.counters;
        let ep = self.endpoint.stats();
        let mut limit_refusals = ep.limit_refusals;
        limit_refusals[LimitKey::HeaderTimeout.index()] += io.header_timeouts;
        DaemonStats {
            rx_frames: io.rx_frames,
            rx_bad_envelope: io.rx_bad_envelope,
            rx_guard_drops: ep.rx_guard_drops
                + self.noise.as_ref().map_or(0, |n| n.stats.guard_drops),
            rx_foreign: ep.rx_foreign,
            rx_no_session: ep.rx_no_session,
            rx_crypto_failures: ep.rx_crypto_failures,
            rx_session_errors: ep.rx_session_errors,
            rx_replay_drops: ep.rx_replay_drops,
            tx_datagrams: io.tx_datagrams,
            tx_errors: io.tx_errors,
            sessions_opened: ep.sessions_opened,
            sessions_closed: ep.sessions_closed,
            sessions_rejected: ep.sessions_rejected,
            sessions_replaced: ep.sessions_replaced,
            streams_opened: ep.streams_opened,
            streams_rejected: ep.streams_rejected,
            limit_refusals,
            rx_cross_worker: io.rx_cross_worker,
            rx_handoff_drops: io.rx_handoff_drops,
            rx_handed_in: io.rx_handed_in,
            cc: self.cc.clone(),
            noise: self.noise.as_ref().map(|n| n.stats).unwrap_or_default(),
        }
    }

    /// The noise wire's clock: monotonic ms since the worker started (does not wrap like [`Core::now`]).
    fn noise_now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The session table (the endpoint's).
    pub(crate) fn sessions(&self) -> &SessionTable<SessionIo> {
        self.endpoint.sessions()
    }

    /// Sources whose datagrams failed the guard or crypto check with no session of theirs (a wrong key or
    /// guard setting): source → failures. Bounded; read by the metrics publisher.
    pub(crate) fn bad_sources(&self) -> &BadSources {
        self.endpoint.bad_sources()
    }

    /// Number of sessions (live or still dialling).
    pub fn session_count(&self) -> usize {
        self.endpoint.len()
    }

    /// Sessions that authenticated a datagram within the last `window_ms` (a client counts as
    /// connected only through these).
    pub fn live_sessions(&self, window_ms: u32) -> usize {
        self.endpoint.live_sessions(self.now(), window_ms)
    }

    /// True when this worker drives shared links (AF_XDP queue sockets).
    pub fn uses_shared_links(&self) -> bool {
        self.links.values().any(|l| l.shared)
    }

    /// Server: a stream's header asked for a proxied connection (PTCP/PUDP); see
    /// [`Endpoint::admit_data_stream`]. On true the caller must call [`Core::end_data_stream`] when the
    /// stream ends.
    /// A refusal by a limit is logged (rate-limited, naming the key).
    pub(crate) fn admit_data_stream(&mut self, id: u64) -> bool {
        match self.endpoint.admit_data_stream(id) {
            Ok(()) => true,
            Err(key) => {
                self.log_refusal(key, id);
                false
            }
        }
    }

    /// Server: a stream of session `id` sent no paqet header within `header_timeout`: counted, and logged
    /// (rate-limited, naming the key).
    pub(crate) fn header_timed_out(&mut self, id: u64) {
        self.counters.header_timeouts += 1;
        self.log_refusal(Some(LimitKey::HeaderTimeout), id);
    }

    /// Logs a refusal by limit `key` (if any) of a stream of session `id`.
    fn log_refusal(&self, key: Option<LimitKey>, id: u64) {
        if let Some(key) = key {
            let peer = self.endpoint.get(id).map(|e| e.peer());
            super::limits::log_refusal(key, &self.cfg, peer);
        }
    }

    /// A proxied stream admitted by [`Core::admit_data_stream`] ended.
    pub(crate) fn end_data_stream(&mut self, id: u64) {
        self.endpoint.end_data_stream(id)
    }

    /// Number of open streams (all sessions).
    pub fn stream_count(&self) -> usize {
        self.endpoint.stream_count()
    }

    /// Sum of the I/O backends' counters.
    pub fn io_stats(&self) -> crate::io::IoStats {
        let mut s = crate::io::IoStats::default();
        for l in self.links.values() {
            let x = l.io.stats();
            s.rx_frames += x.rx_frames;
            s.rx_bytes += x.rx_bytes;
            s.tx_frames += x.tx_frames;
            s.tx_bytes += x.tx_bytes;
            s.tx_errors += x.tx_errors;
            s.tx_drops += x.tx_drops;
            s.kernel_drops += x.kernel_drops;
            s.if_drops += x.if_drops;
            s.rx_truncated += x.rx_truncated;
            s.xsk_rx_dropped += x.xsk_rx_dropped;
            s.xsk_rx_ring_full += x.xsk_rx_ring_full;
            s.xsk_fill_ring_empty += x.xsk_fill_ring_empty;
            s.xsk_rx_invalid_descs += x.xsk_rx_invalid_descs;
            s.xsk_tx_invalid_descs += x.xsk_tx_invalid_descs;
            s.xsk_tx_ring_empty += x.xsk_tx_ring_empty;
        }
        s
    }

    /// Sum of the sessions' counters.
    pub fn session_stats(&self) -> crate::proto::session::SessionStats {
        let mut s = crate::proto::session::SessionStats::default();
        for e in self.endpoint.sessions().values() {
            let x = e.session.stats();
            s.datagrams_in += x.datagrams_in;
            s.datagrams_out += x.datagrams_out;
            s.bytes_in += x.bytes_in;
            s.bytes_out += x.bytes_out;
            s.crypto_failures += x.crypto_failures;
            s.fec_errors += x.fec_errors;
            s.kcp_errors += x.kcp_errors;
        }
        s
    }

    pub(crate) fn set_accept_channel(&mut self, tx: mpsc::UnboundedSender<(u64, u32)>) {
        self.accept_tx = Some(tx);
    }

    /// Adds a link for local `port`; returns its id, readiness fd and retire signal.
    pub(crate) fn add_link(
        &mut self,
        io: Box<dyn PacketIo>,
        port: u16,
        env4: Option<EnvelopeBuilder>,
        env6: Option<EnvelopeBuilder>,
    ) -> (u64, Option<RawFd>, Rc<Notify>) {
        let id = self.next_link;
        self.next_link += 1;
        let fd = io.raw_fd();
        // Frames are built for the link's medium (Ethernet, or bare IP on tun/ppp/WireGuard).
        let medium = io.medium();
        let (env4, env6) = (
            env4.map(|e| e.with_medium(medium)),
            env6.map(|e| e.with_medium(medium)),
        );
        let retire = Rc::new(Notify::new());
        self.links.insert(
            id,
            Link {
                io,
                port,
                shared: false,
                env4,
                env6,
                retire: retire.clone(),
            },
        );
        (id, fd, retire)
    }

    /// Adds a shared link (one backend carrying many sessions, e.g. an AF_XDP queue socket). `port` is
    /// the local port to accept (server) or 0 for any (client: frames are dispatched by destination port).
    pub(crate) fn add_shared_link(
        &mut self,
        io: Box<dyn PacketIo>,
        port: u16,
        env4: Option<EnvelopeBuilder>,
        env6: Option<EnvelopeBuilder>,
    ) -> (u64, Option<RawFd>, Rc<Notify>) {
        let r = self.add_link(io, port, env4, env6);
        if let Some(l) = self.links.get_mut(&r.0) {
            l.shared = true;
        }
        r
    }

    /// Installs the cross-worker router (XDP mode).
    pub(crate) fn set_router(&mut self, router: super::xdp::Router) {
        self.router = Some(router);
    }

    /// True if a live session uses local port `port` on link `link` towards `peer`.
    pub(crate) fn has_session_on(&self, link: u64, port: u16, peer: SocketAddr) -> bool {
        self.endpoint.has_session_on(link, port, peer)
    }

    /// Client: registers the session dialled to `server` on `link` (local port `local_port`) with
    /// conversation `conv`; returns its id. `env` is the session's own envelope when its source port
    /// differs from the link's.
    pub(crate) fn connect(
        &mut self,
        link: u64,
        local_port: u16,
        server: SocketAddr,
        conv: u32,
        env: Option<EnvelopeBuilder>,
    ) -> Result<u64, SessionConfigError> {
        let now = self.now();
        let env = match self.links.get(&link) {
            Some(l) => env.map(|e| e.with_medium(l.io.medium())),
            None => env,
        };
        let io = SessionIo {
            env,
            ..SessionIo::default()
        };
        let id = self
            .endpoint
            .connect(now, link, local_port, server, conv, io)?;
        if let Some(n) = self.noise.as_mut() {
            n.session_added(id);
        }
        self.session_added(id, now);
        self.noise_tick();
        Ok(id)
    }

    /// A session entered the table: schedule its first flush.
    fn session_added(&mut self, id: u64, now: u32) {
        if let Some(e) = self.endpoint.get_mut(id) {
            e.io.deadline = e.session.poll_deadline(now);
        }
        self.mark_dirty(id);
    }

    /// Schedules a flush of session `id` by the driver.
    pub(crate) fn mark_dirty(&mut self, id: u64) {
        if let Some(e) = self.endpoint.get_mut(id) {
            if !e.io.dirty {
                e.io.dirty = true;
                self.dirty.push(id);
                self.notify.notify_one();
            }
        }
    }

    /// Registers a task-held stream (wakers) on session `id`.
    pub(crate) fn register_stream(&mut self, id: u64, sid: u32) {
        if let Some(e) = self.endpoint.get_mut(id) {
            if e.io.streams.insert(sid, StreamSlot::default()).is_none() {
                self.endpoint.stream_opened(id);
            }
        }
    }

    /// Closes a task-held stream (FIN) and forgets it.
    pub(crate) fn release_stream(&mut self, id: u64, sid: u32) {
        if let Some(e) = self.endpoint.get_mut(id) {
            e.session.close_stream(sid);
            if e.io.streams.remove(&sid).is_some() {
                self.endpoint.stream_closed(id);
            }
            self.mark_dirty(id);
        }
    }

    /// Server: the flag list a client sent with PTCPF (empty list = forget it, spec §3.7).
    pub(crate) fn set_peer_flags(&mut self, peer: SocketAddr, flags: &[u16]) {
        if flags.is_empty() {
            self.peer_flags.remove(&peer);
            return;
        }
        match FlagCycler::new(flags.iter().map(|&f| TcpFlags(f)).collect()) {
            Ok(c) => {
                debug!(%peer, flags = ?c.flags(), "client flag list stored");
                self.peer_flags.insert(peer, c);
            }
            Err(e) => debug!(%peer, error = %e, "PTCPF flag list refused"),
        }
    }

    /// Drops session `id`: wakes every task waiting on it; on a client also retires its link.
    pub(crate) fn kill_session(&mut self, id: u64, why: &str) {
        if let Some(closed) = self.endpoint.close(id, CloseReason::Local(why.to_owned())) {
            self.session_closed(closed);
        }
    }

    /// The I/O side of a closed session: keeps its congestion-control counters, wakes its stream tasks,
    /// forgets the client's flag list (server) or retires its link and frees its slot (client).
    fn session_closed(&mut self, closed: Closed<SessionIo>) {
        let Closed {
            id,
            peer,
            link,
            session,
            io: mut sio,
            ..
        } = closed;
        if let Some(n) = self.noise.as_mut() {
            n.session_gone(id);
        }
        let cc = session.cc_stats();
        let r = &mut self.cc_retired;
        r.bytes_sent = r.bytes_sent.saturating_add(cc.bytes_sent);
        r.bytes_delivered = r.bytes_delivered.saturating_add(cc.bytes_delivered);
        r.spurious_retrans = r.spurious_retrans.saturating_add(cc.spurious_retrans);
        for slot in sio.streams.values_mut() {
            slot.wake_all();
        }
        match self.cfg.role {
            Role::Server => {
                if !self.endpoint.serves_peer(peer) {
                    // The client re-sends PTCPF at the start of any new session.
                    self.peer_flags.remove(&peer);
                }
            }
            Role::Client => {
                if let Some(l) = self.links.get(&link).filter(|l| !l.shared) {
                    l.retire.notify_one();
                }
                self.client.session_gone(id);
            }
        }
    }

    // ------------------------------------------------------------------------------------------------
    // TX
    // ------------------------------------------------------------------------------------------------

    /// Runs the session's timers and sends what it has; then dispatches its events.
    fn flush_session(&mut self, id: u64, now: u32, unix_secs: u64) {
        let Core {
            endpoint,
            links,
            peer_flags,
            local_flags,
            tx_guard: guard,
            counters,
            cfg,
            noise,
            start,
            ..
        } = self;
        let noise_now = start.elapsed().as_millis() as u64;
        let Some(e) = endpoint.get_mut(id) else {
            return;
        };
        let (peer, link_id) = (e.peer(), e.link());
        let crate::proto::endpoint::Entry {
            session, io: sio, ..
        } = e;
        sio.dirty = false;
        if let Some(link) = links.get_mut(&link_id) {
            let flags = match cfg.role {
                Role::Server => peer_flags.get(&peer).unwrap_or(local_flags),
                Role::Client => &*local_flags,
            };
            let Link { io, env4, env6, .. } = link;
            let env = match sio.env.as_mut() {
                Some(own) => Some(own),
                None if peer.is_ipv4() => env4.as_mut(),
                None => env6.as_mut(),
            };
            if let Some(env) = env {
                if env.destination() != peer {
                    let _ = env.set_destination(peer);
                }
                let at = Addressing {
                    src: env.source(),
                    dst: peer,
                    to_server: cfg.role == Role::Client,
                };
                let mut sent = false;
                session.poll_transmit(now, &mut |dgram: &[u8]| {
                    let dgram = match noise.as_mut() {
                        None => dgram,
                        Some(n) => match n.seal(noise_now, id, dgram) {
                            Some(sealed) => sealed,
                            None => return,
                        },
                    };
                    inject_datagram(
                        &mut **io, env, flags, guard, &at, unix_secs, dgram, counters,
                    );
                    sent = true;
                });
                if sent {
                    if let Err(err) = io.flush() {
                        trace!(%peer, error = %err, "flush of injected frames failed");
                    }
                }
            }
        }
        sio.deadline = session.poll_deadline(now);
        // Blocked writers retry after every flush (KCP may have taken smux's queue, freeing send buffer);
        // they re-register if still blocked. Readers are woken by smux's Readable/Fin events only, so idle
        // streams cost nothing here.
        for slot in sio.streams.values_mut() {
            if let Some(w) = slot.write.take() {
                w.wake();
            }
        }
        self.dispatch_events(id);
    }

    /// Turns the session's smux events into wake-ups, accepted streams and session death.
    fn dispatch_events(&mut self, id: u64) {
        let mut dead: Option<String> = None;
        loop {
            let Some(e) = self.endpoint.get_mut(id) else {
                return;
            };
            let Some(ev) = e.session.poll_event() else {
                break;
            };
            match ev {
                SmuxEvent::Opened(sid) => self.on_peer_opened(id, sid),
                SmuxEvent::Readable(sid) | SmuxEvent::Fin(sid) => {
                    if let Some(s) = e.io.streams.get_mut(&sid) {
                        if let Some(w) = s.read.take() {
                            w.wake();
                        }
                        if let Some(w) = s.write.take() {
                            w.wake();
                        }
                    }
                }
                SmuxEvent::Writable(sid) => {
                    if let Some(w) = e.io.streams.get_mut(&sid).and_then(|s| s.write.take()) {
                        w.wake();
                    }
                }
                SmuxEvent::Closed(err) => dead = Some(err.to_string()),
            }
        }
        if dead.is_none() {
            if let Some(e) = self.endpoint.get(id) {
                if e.session.is_dead() {
                    dead = Some("session dead".into());
                }
            }
        }
        if let Some(why) = dead {
            self.kill_session(id, &why);
        }
    }

    /// Server: the peer opened stream `sid`; the endpoint applies the limits, then it goes to the accept
    /// task.
    fn on_peer_opened(&mut self, id: u64, sid: u32) {
        if let Err(key) = self
            .endpoint
            .admit_peer_stream(id, sid, self.accept_tx.is_some())
        {
            self.log_refusal(key, id);
            self.mark_dirty(id);
            return;
        }
        self.register_stream(id, sid);
        if let Some(tx) = &self.accept_tx {
            let _ = tx.send((id, sid));
        }
    }

    /// Gathers every live session's congestion-control figures into [`DaemonStats::cc`] (for the metrics
    /// publisher) and logs, once per session, a window that keeps a sender below the path's
    /// bandwidth-delay product. The driver calls it every [`CC_REFRESH_MS`].
    pub fn refresh_cc(&mut self) {
        let mut snap = CcSnapshot::default();
        for (_, e) in self.endpoint.sessions_mut() {
            let s = e.session.cc_stats();
            let conv = e.session.conv();
            let peer = e.peer();
            if let Some(msg) = window_limited_warning(
                peer,
                conv,
                &s,
                &mut e.io.cc_window_warned,
                &mut self.cc_window_limited_total,
            ) {
                warn!(
                    peer = %peer,
                    window = s.window_limited_by.unwrap_or_default(),
                    bdp_segments = s.bdp_segments,
                    "{msg}"
                );
            }
            snap.add_session(peer, &s);
        }
        let r = self.cc_retired;
        snap.add_retired(r.bytes_sent, r.bytes_delivered, r.spurious_retrans);
        snap.window_limited_total = self.cc_window_limited_total;
        snap.finish();
        self.cc = snap;
        self.cc_refreshed = Some(self.now());
    }

    /// Flushes every dirty session and every session whose deadline passed.
    pub(crate) fn service(&mut self) {
        self.noise_tick();
        let now = self.now();
        let unix_secs = unix_now().as_secs();
        if self
            .cc_refreshed
            .is_none_or(|t| now.wrapping_sub(t) >= CC_REFRESH_MS)
        {
            self.refresh_cc();
        }
        let mut ids = std::mem::take(&mut self.dirty);
        for (&id, e) in self.endpoint.sessions().iter() {
            if !e.io.dirty && due(e.io.deadline, now) {
                ids.push(id);
            }
        }
        for &id in &ids {
            self.flush_session(id, now, unix_secs);
        }
        ids.clear();
        if self.dirty.is_empty() {
            self.dirty = ids; // keep the allocation
        }
    }

    /// How long the driver may sleep.
    pub(crate) fn next_wait(&self) -> Duration {
        if !self.dirty.is_empty() {
            return Duration::ZERO;
        }
        let now = self.now();
        let mut wait = MAX_IDLE_WAIT.as_millis() as u32;
        if self.noise.is_some() {
            wait = wait.min(NOISE_TICK_MS);
        }
        for e in self.endpoint.sessions().values() {
            let d = e.io.deadline.wrapping_sub(now) as i32;
            wait = wait.min(d.max(1) as u32);
        }
        Duration::from_millis(u64::from(wait))
    }

    // ------------------------------------------------------------------------------------------------
    // RX
    // ------------------------------------------------------------------------------------------------

    /// Drains up to one batch from link `link_id` and processes it. Returns frames received.
    pub(crate) fn rx_link(&mut self, link_id: u64) -> std::io::Result<usize> {
        let now = self.now();
        let unix_secs = unix_now().as_secs();
        let mut arena = std::mem::take(&mut self.rx_arena);
        let mut frames = std::mem::take(&mut self.rx_frames);
        arena.clear();
        frames.clear();
        let (n, port, medium) = {
            let Some(link) = self.links.get_mut(&link_id) else {
                return Ok(0);
            };
            let n = link.io.recv_batch(Duration::ZERO, &mut |f: &[u8]| {
                let off = arena.len();
                arena.extend_from_slice(f);
                frames.push((off, f.len()));
            });
            (n, link.port, link.io.medium())
        };
        for &(off, len) in &frames {
            let frame = &mut arena[off..off + len];
            self.handle_frame(link_id, port, medium, frame, now, unix_secs);
        }
        self.rx_arena = arena;
        self.rx_frames = frames;
        if let Some(r) = self.router.as_mut() {
            r.wake_owners();
        }
        self.flush_dirty(now, unix_secs);
        n
    }

    /// Flushes the sessions marked dirty since the last pass (at the end of an RX batch).
    fn flush_dirty(&mut self, now: u32, unix_secs: u64) {
        if !self.dirty.is_empty() {
            let mut ids = std::mem::take(&mut self.dirty);
            for &id in &ids {
                self.flush_session(id, now, unix_secs);
            }
            ids.clear();
            if self.dirty.is_empty() {
                self.dirty = ids; // keep the allocation
            }
        }
    }

    /// XDP mode: processes up to one batch of frames other workers handed to this one (frames of sessions
    /// this worker owns that landed on another queue). Returns the number processed.
    pub(crate) fn rx_handoff(&mut self, link_id: u64) -> usize {
        let Some(mut router) = self.router.take() else {
            return 0;
        };
        let now = self.now();
        let unix_secs = unix_now().as_secs();
        let (port, medium) = self
            .links
            .get(&link_id)
            .map_or((0, Medium::Ethernet), |l| (l.port, l.io.medium()));
        let n = router.drain_inbox(&mut |frame: &mut [u8]| {
            self.counters.rx_handed_in += 1;
            self.handle_frame(link_id, port, medium, frame, now, unix_secs);
        });
        self.router = Some(router);
        self.flush_dirty(now, unix_secs);
        n
    }

    /// Parses one frame's envelope, hands frames of other workers' sessions to their owner (XDP mode) and
    /// gives the TCP payload to the endpoint, then acts on its decision.
    fn handle_frame(
        &mut self,
        link_id: u64,
        port: u16,
        medium: Medium,
        frame: &mut [u8],
        now: u32,
        unix_secs: u64,
    ) {
        self.counters.rx_frames += 1;
        let want = (port != 0).then_some(port);
        let (src, dst, off, len) = match parse_frame_on(medium, frame, want) {
            Ok(p) => (
                p.src_addr(),
                p.dst_addr(),
                p.payload.as_ptr() as usize - frame.as_ptr() as usize,
                p.payload.len(),
            ),
            Err(e) => {
                self.counters.rx_bad_envelope += 1;
                trace!(reason = e.reason(), "frame dropped");
                return;
            }
        };
        if let Some(r) = self.router.as_mut() {
            let owner = r.owner(self.cfg.role, src, dst.port());
            if owner != r.index() {
                if r.hand_to(owner, frame) {
                    self.counters.rx_cross_worker += 1;
                } else {
                    self.counters.rx_handoff_drops += 1;
                }
                return;
            }
        }
        let payload = &mut frame[off..off + len];
        if self.noise.is_some() {
            self.noise_rx(link_id, dst, src, payload, now, unix_secs);
            return;
        }
        self.deliver(link_id, dst, src, payload, now, unix_secs);
    }

    /// Hands one (decrypted, for the noise wire) datagram to the endpoint and acts on its decision.
    fn deliver(
        &mut self,
        link_id: u64,
        dst: SocketAddr,
        src: SocketAddr,
        payload: &mut [u8],
        now: u32,
        unix_secs: u64,
    ) -> Option<u64> {
        match self
            .endpoint
            .handle_at(now, unix_secs, link_id, dst, src, payload)
        {
            DatagramEvent::Input { id, accepted } => {
                if accepted && self.cfg.role == Role::Client {
                    self.client.session_alive(id);
                }
                self.mark_dirty(id);
                Some(id)
            }
            DatagramEvent::Opened(id) => {
                self.session_added(id, now);
                Some(id)
            }
            DatagramEvent::Closed(closed) => {
                self.session_closed(*closed);
                None
            }
            DatagramEvent::Dropped(DropReason::SessionLimit) => {
                super::limits::log_refusal(LimitKey::MaxSessions, &self.cfg, Some(src));
                None
            }
            DatagramEvent::Dropped(_) => None,
        }
    }

    // ------------------------------------------------------------------------------------------------
    // The noise wire (`worker::noise`)
    // ------------------------------------------------------------------------------------------------

    /// A payload of the noise wire: handshake messages are answered, transport messages opened and
    /// delivered to the endpoint like kcp-go-decrypted datagrams.
    fn noise_rx(
        &mut self,
        link_id: u64,
        dst: SocketAddr,
        src: SocketAddr,
        payload: &[u8],
        now: u32,
        unix_secs: u64,
    ) {
        use super::noise::Rx;
        let noise_now = self.noise_now();
        // The session of this source (client: the one the server's datagram is for).
        let known = self.endpoint.session_on(link_id, dst.port(), src);
        let session = match self.cfg.role {
            Role::Server => None,
            Role::Client => known,
        };
        let Some(n) = self.noise.as_mut() else {
            return;
        };
        let at = Addressing {
            src,
            dst,
            to_server: self.cfg.role == Role::Server,
        };
        match n.rx(noise_now, unix_secs, &at, session, payload) {
            Rx::Nothing => {}
            Rx::Reply => {
                let bytes = std::mem::take(&mut n.buf);
                self.send_raw(link_id, None, src, &bytes, unix_secs);
                if let Some(n) = self.noise.as_mut() {
                    n.buf = bytes;
                }
            }
            Rx::Established(id) => {
                let bytes = std::mem::take(&mut n.buf);
                self.send_raw(link_id, Some(id), src, &bytes, unix_secs);
                if let Some(n) = self.noise.as_mut() {
                    n.buf = bytes;
                }
                self.mark_dirty(id);
            }
            Rx::Deliver => {
                let mut body = std::mem::take(&mut n.buf);
                // Server: a datagram of one client key never reaches a session bound to another key.
                let allowed = match (self.cfg.role, known) {
                    (Role::Server, Some(id)) => {
                        self.noise.as_mut().is_some_and(|n| n.may_deliver_to(id))
                    }
                    _ => true,
                };
                if allowed {
                    if let Some(id) = self.deliver(link_id, dst, src, &mut body, now, unix_secs) {
                        if let Some(n) = self.noise.as_mut() {
                            n.bind(id);
                        }
                    }
                }
                if let Some(n) = self.noise.as_mut() {
                    n.buf = body;
                }
            }
        }
    }

    /// The noise wire's timers: sends due initiations (client), closes sessions whose keys are gone
    /// (server).
    fn noise_tick(&mut self) {
        let noise_now = self.noise_now();
        let unix = unix_now();
        let server = self.cfg.server_addr;
        let Some(n) = self.noise.as_mut() else {
            return;
        };
        let (sends, dead) = n.tick(noise_now, unix.as_millis() as u64, server);
        for (id, bytes) in sends {
            let Some((link, peer)) = self.endpoint.get(id).map(|e| (e.link(), e.peer())) else {
                continue;
            };
            self.send_raw(link, Some(id), peer, &bytes, unix.as_secs());
        }
        for id in dead {
            self.kill_session(id, "noise keys expired");
        }
    }

    /// Sends one message outside any session's flush (a handshake message) on `link_id` to `peer`, with
    /// the session's own envelope when it has one (client sessions of an XDP worker).
    fn send_raw(
        &mut self,
        link_id: u64,
        session: Option<u64>,
        peer: SocketAddr,
        bytes: &[u8],
        unix_secs: u64,
    ) {
        let Core {
            endpoint,
            links,
            peer_flags,
            local_flags,
            tx_guard: guard,
            counters,
            cfg,
            ..
        } = self;
        let Some(link) = links.get_mut(&link_id) else {
            return;
        };
        let flags = match cfg.role {
            Role::Server => peer_flags.get(&peer).unwrap_or(local_flags),
            Role::Client => &*local_flags,
        };
        let Link { io, env4, env6, .. } = link;
        let own = session
            .and_then(|id| endpoint.get_mut(id))
            .and_then(|e| e.io.env.as_mut());
        let env = match own {
            Some(own) => Some(own),
            None if peer.is_ipv4() => env4.as_mut(),
            None => env6.as_mut(),
        };
        let Some(env) = env else {
            return;
        };
        if env.destination() != peer {
            let _ = env.set_destination(peer);
        }
        let at = Addressing {
            src: env.source(),
            dst: peer,
            to_server: cfg.role == Role::Client,
        };
        inject_datagram(
            &mut **io, env, flags, guard, &at, unix_secs, bytes, counters,
        );
        if let Err(err) = io.flush() {
            trace!(%peer, error = %err, "flush of injected frames failed");
        }
    }
}

/// Frames one datagram to `at.dst` into the link's TX (flushed by the caller): the guard prefix over
/// `bytes` when the guard is on, then the envelope with the next TCP flags of `flags`; counts it as sent or
/// failed. One path for session flushes and the noise wire's handshake messages.
#[inline]
#[allow(clippy::too_many_arguments)]
fn inject_datagram(
    io: &mut dyn PacketIo,
    env: &mut EnvelopeBuilder,
    flags: &FlagCycler,
    guard: &mut Option<Guard>,
    at: &Addressing,
    unix_secs: u64,
    bytes: &[u8],
    counters: &mut IoCounters,
) {
    let glen = guard.as_ref().map_or(0, Guard::prefix_len);
    let f = flags.next();
    let hl = env.header_len(f);
    let total = hl + glen + bytes.len();
    let r = io.send_with(total, &mut |buf: &mut [u8]| {
        if let Some(g) = guard.as_mut() {
            g.write_prefix(unix_secs, at, bytes, &mut buf[hl..hl + glen]);
        }
        buf[hl + glen..total].copy_from_slice(bytes);
        env.emit(f, glen + bytes.len(), &mut buf[..total])
            .unwrap_or(0)
    });
    match r {
        Ok(()) => counters.tx_datagrams += 1,
        Err(err) => {
            counters.tx_errors += 1;
            trace!(peer = %at.dst, error = %err, "frame injection failed");
        }
    }
}

/// A raw fd that tokio's reactor watches (the backend owns and closes the descriptor).
struct WatchedFd(RawFd);

impl AsRawFd for WatchedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Spawns (on the current `LocalSet`) the RX task of link `link_id`.
pub(crate) fn spawn_link_rx(shared: Shared, link_id: u64, fd: Option<RawFd>, retire: Rc<Notify>) {
    tokio::task::spawn_local(async move {
        if let Err(e) = link_rx(&shared, link_id, fd, &retire).await {
            warn!(error = %e, "packet receive failed; link stopped");
        }
        shared.borrow_mut().links.remove(&link_id);
    });
}

async fn link_rx(
    shared: &Shared,
    link_id: u64,
    fd: Option<RawFd>,
    retire: &Notify,
) -> std::io::Result<()> {
    let afd = match fd {
        // SAFETY: the descriptor belongs to the link's backend, which stays in `Core::links` until this
        // function has returned (and dropped `afd`): only `spawn_link_rx` removes the link, after us.
        Some(fd) => {
            Some(unsafe { AsyncFd::register_with_interest(WatchedFd(fd), Interest::READABLE)? })
        }
        None => None,
    };
    loop {
        match &afd {
            Some(afd) => {
                let mut guard = tokio::select! {
                    g = afd.readable() => g?,
                    _ = retire.notified() => return Ok(()),
                };
                loop {
                    let n = shared.borrow_mut().rx_link(link_id)?;
                    if n == 0 {
                        guard.clear_ready();
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
            None => {
                // Backend without a readiness fd: short poll loop.
                let n = shared.borrow_mut().rx_link(link_id)?;
                if n == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                        _ = retire.notified() => return Ok(()),
                    }
                }
            }
        }
    }
}

/// The driver task: runs timers and flushes dirty sessions until the runtime stops.
pub(crate) async fn drive(shared: Shared) {
    loop {
        let (notify, wait) = {
            let mut c = shared.borrow_mut();
            c.service();
            (c.notify.clone(), c.next_wait())
        };
        if wait.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod cc_tests {
    use super::*;
    use crate::proto::kcp::{KcpConfig, KcpMode};
    use crate::proto::session::Session;
    use crate::proto::session::SessionConfig;
    use crate::proto::smux::SmuxConfig;
    use crate::wire::crypt::{BlockMode, Crypto};

    fn server_core() -> Shared {
        Core::new(WorkerConfig {
            role: Role::Server,
            session: SessionConfig {
                crypto: Crypto::from_derived(BlockMode::Aes, &[7; 32]).expect("crypto"),
                dshard: 0,
                pshard: 0,
                kcp: KcpConfig::preset(KcpMode::Fast),
                smux: SmuxConfig::default(),
                mtu: 1350,
            },
            local_mac: [2, 0, 0, 0, 0, 2],
            ipv4: None,
            ipv6: None,
            server_addr: None,
            servers: Vec::new(),
            conn: 1,
            local_flags: vec![TcpFlags::PSH_ACK],
            remote_flags: vec![],
            guard: None,
            probe_response: Default::default(),
            limits: super::super::Limits::default(),
            header_timeout: Duration::from_secs(10),
            rotate: Default::default(),
            reverse: Default::default(),
            targets: Default::default(),
            replay: None,
            noise: None,
        })
        .expect("core")
    }

    #[test]
    fn window_limited_is_warned_once_per_session() {
        let peer: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let mut s = CcStats {
            sndwnd: 32,
            rmt_wnd: 128,
            bdp_segments: 900,
            ..CcStats::default()
        };
        let (mut warned, mut totals) = (false, [0u64; 2]);
        assert_eq!(
            window_limited_warning(peer, 1, &s, &mut warned, &mut totals),
            None,
            "not limited"
        );
        assert!(!warned);
        s.window_limited_by = Some("sndwnd");
        let msg =
            window_limited_warning(peer, 0xab, &s, &mut warned, &mut totals).expect("first time");
        assert!(msg.contains("transport.kcp.sndwnd = 32 segments"), "{msg}");
        assert!(
            msg.contains("bandwidth-delay product (900 segments)"),
            "{msg}"
        );
        assert!(msg.contains("\"auto\" or at least 900"), "{msg}");
        assert!(
            msg.contains("10.0.0.1:4000") && msg.contains("000000ab"),
            "{msg}"
        );
        assert_eq!(totals, [1, 0]);
        // Never again for this session, whichever window limits it later.
        assert_eq!(
            window_limited_warning(peer, 0xab, &s, &mut warned, &mut totals),
            None
        );
        s.window_limited_by = Some("peer_rcvwnd");
        assert_eq!(
            window_limited_warning(peer, 0xab, &s, &mut warned, &mut totals),
            None
        );
        assert_eq!(totals, [1, 0]);
        // Another session limited by the peer's window.
        let mut other = false;
        let msg =
            window_limited_warning(peer, 2, &s, &mut other, &mut totals).expect("another session");
        assert!(
            msg.contains("the peer's receive window (128 segments advertised)"),
            "{msg}"
        );
        assert!(
            msg.contains("transport.kcp.rcvwnd = \"auto\" or at least 900 on the peer"),
            "{msg}"
        );
        assert_eq!(totals, [1, 1]);
    }

    #[test]
    fn refresh_gathers_sessions_and_keeps_counters_of_gone_ones() {
        let shared = server_core();
        let mut c = shared.borrow_mut();
        c.refresh_cc();
        assert_eq!(c.stats().cc, CcSnapshot::default(), "no session");
        let peer: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let mut session = Session::new(Role::Server, 0x1234, &c.cfg.session, 0).expect("session");
        let sid = session.open_stream().expect("stream");
        assert!(session.write(sid, &[0x55; 4000]).expect("write") > 0);
        session.poll_transmit(10, &mut |_| {});
        let sent = session.cc_stats().bytes_sent;
        assert!(sent > 0, "the session sent data");
        let id = c
            .endpoint
            .insert(0, 1, 9999, peer, session, SessionIo::default());
        c.refresh_cc();
        let cc = c.stats().cc;
        assert_eq!(cc.states.iter().map(|(_, _, n)| n).sum::<u64>(), 1);
        assert_eq!(cc.bytes_sent, sent);
        assert_eq!(cc.top.len(), 1);
        assert_eq!(cc.top[0].peer, peer);
        // The snapshot the publisher builds carries it.
        let w = crate::ops::WorkerSnapshot::from_daemon(&c.stats(), &crate::io::IoStats::default());
        assert_eq!(w.cc, cc);
        c.kill_session(id, "test");
        c.refresh_cc();
        assert!(
            c.stats().cc.top.is_empty() && c.stats().cc.states.is_empty(),
            "the gone session left the lists"
        );
        assert_eq!(
            c.stats().cc.bytes_sent,
            sent,
            "sent bytes stay counted after the session went"
        );
    }
}
