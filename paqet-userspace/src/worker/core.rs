//! Shared worker state: links (packet-I/O backends), sessions, timers, limits and counters.
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
use tracing::{debug, info, trace, warn};

use super::client::ClientState;
use super::guard::{Guard, GUARD_LEN};
use super::WorkerConfig;
use crate::io::PacketIo;
use crate::ops::metrics::{window_limited_index, CcSnapshot};
use crate::proto::cc::CcStats;
use crate::proto::session::{Role, Session, SessionError};
use crate::proto::smux::SmuxEvent;
use crate::wire::crypt::Crypto;
use crate::wire::envelope::{parse_frame_on, EnvelopeBuilder, FlagCycler, Medium, TcpFlags};

/// The worker's shared state handle.
pub type Shared = Rc<RefCell<Core>>;

/// Longest the driver sleeps without a deadline (keeps the clock moving for keepalives).
const MAX_IDLE_WAIT: Duration = Duration::from_millis(1000);

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

/// One session and the streams tasks hold on it.
pub(crate) struct Entry {
    pub session: Session,
    pub link: u64,
    /// Local TCP port the session's frames carry (the link's port, or on a shared link the session's own).
    pub local_port: u16,
    pub peer: SocketAddr,
    /// Envelope of a session on a shared link whose source port differs from the link's (client sessions
    /// of an XDP worker); `None` = use the link's builders.
    pub env: Option<EnvelopeBuilder>,
    pub streams: HashMap<u32, StreamSlot>,
    /// Proxied streams (PTCP/PUDP past their header) counted against `max_streams_per_session`.
    pub data_streams: usize,
    /// When a datagram of this session last authenticated (worker ms clock); `None` = never.
    pub last_rx: Option<u32>,
    pub dirty: bool,
    pub deadline: u32,
    /// The "held below the BDP by a window" warning was logged for this session (once per session).
    pub cc_window_warned: bool,
}

/// Streams beyond the stream limits that may wait for their header (control streams, slow headers).
const PENDING_STREAM_SLACK: usize = 64;

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

/// The worker's state. See the module docs.
pub struct Core {
    pub(crate) cfg: Rc<WorkerConfig>,
    start: Instant,
    pub(crate) links: HashMap<u64, Link>,
    next_link: u64,
    pub(crate) sessions: HashMap<u64, Entry>,
    /// (link, local port, peer) → session.
    by_peer: HashMap<(u64, u16, SocketAddr), u64>,
    next_session: u64,
    dirty: Vec<u64>,
    pub(crate) notify: Rc<Notify>,
    /// Server: flag lists clients sent with PTCPF, keyed by client address.
    pub(crate) peer_flags: HashMap<SocketAddr, FlagCycler>,
    local_flags: FlagCycler,
    guard: Option<Guard>,
    /// Server: decrypts a copy of an unknown source's first datagram to learn its conv.
    probe: Crypto,
    rx_arena: Vec<u8>,
    rx_frames: Vec<(usize, usize)>,
    scratch: Vec<u8>,
    /// Server: streams the peer opened, handed to the accept task.
    accept_tx: Option<mpsc::UnboundedSender<(u64, u32)>>,
    pub(crate) streams_total: usize,
    /// Proxied streams of all sessions (`max_streams_total`).
    pub(crate) data_streams_total: usize,
    /// Sources whose datagrams failed the guard or crypto check before any session of theirs existed
    /// (a wrong key or guard setting): source → failures. Bounded; read by the metrics publisher.
    pub(crate) bad_sources: HashMap<SocketAddr, u64>,
    pub(crate) client: ClientState,
    /// XDP mode: where frames of other workers' sessions go.
    pub(crate) router: Option<super::xdp::Router>,
    pub stats: DaemonStats,
    /// When [`Core::refresh_cc`] last ran (worker ms clock).
    cc_refreshed: Option<u32>,
    /// Cumulative congestion-control counters of sessions that are gone.
    cc_retired: CcRetired,
    /// Sessions that became window-limited, by [`WINDOW_LIMITED_BY`](crate::ops::metrics::WINDOW_LIMITED_BY).
    cc_window_limited_total: [u64; 2],
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
    pub fn new(cfg: WorkerConfig) -> Shared {
        let local_flags = FlagCycler::new(cfg.local_flags.clone()).unwrap_or_else(|_| {
            FlagCycler::new(vec![TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0)]).expect("one entry")
        });
        let guard = cfg
            .guard
            .as_ref()
            .map(|(g, key)| Guard::new(g.clone(), key));
        let probe = cfg.session.crypto.clone();
        let conn = cfg.conn.max(1);
        Rc::new(RefCell::new(Core {
            cfg: Rc::new(cfg),
            start: Instant::now(),
            links: HashMap::default(),
            next_link: 1,
            sessions: HashMap::default(),
            by_peer: HashMap::default(),
            next_session: 1,
            dirty: Vec::new(),
            notify: Rc::new(Notify::new()),
            peer_flags: HashMap::default(),
            local_flags,
            guard,
            probe,
            rx_arena: Vec::with_capacity(64 * 2048),
            rx_frames: Vec::with_capacity(64),
            scratch: Vec::with_capacity(2048),
            accept_tx: None,
            streams_total: 0,
            data_streams_total: 0,
            bad_sources: HashMap::default(),
            client: ClientState::new(conn),
            router: None,
            stats: DaemonStats::default(),
            cc_refreshed: None,
            cc_retired: CcRetired::default(),
            cc_window_limited_total: [0; 2],
        }))
    }

    /// The worker clock: milliseconds since the worker started (wrapping u32).
    pub fn now(&self) -> u32 {
        self.start.elapsed().as_millis() as u32
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    /// Number of sessions (live or still dialling).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions that authenticated a datagram within the last `window_ms` (a client counts as
    /// connected only through these).
    pub fn live_sessions(&self, window_ms: u32) -> usize {
        let now = self.now();
        self.sessions
            .values()
            .filter(|e| e.last_rx.is_some_and(|t| now.wrapping_sub(t) <= window_ms))
            .count()
    }

    /// True when this worker drives shared links (AF_XDP queue sockets).
    pub fn uses_shared_links(&self) -> bool {
        self.links.values().any(|l| l.shared)
    }

    /// Records a datagram from `src` that failed the guard or crypto check with no session of its own.
    fn note_bad_source(&mut self, src: SocketAddr) {
        const MAX_BAD_SOURCES: usize = 256;
        let n = self.bad_sources.len();
        if let Some(c) = self.bad_sources.get_mut(&src) {
            *c += 1;
        } else if n < MAX_BAD_SOURCES {
            self.bad_sources.insert(src, 1);
        }
    }

    /// Server: a stream's header asked for a proxied connection (PTCP/PUDP). Applies
    /// `max_streams_per_session` and `max_streams_total` to proxied streams only (the PTCPF and liveness
    /// streams upstream clients open around every connection are control traffic, not counted). Returns
    /// false (and counts the rejection) when a limit is reached; on true the caller must call
    /// [`Core::end_data_stream`] when the stream ends.
    pub(crate) fn admit_data_stream(&mut self, id: u64) -> bool {
        let limits = self.cfg.limits;
        let total = self.data_streams_total;
        let Some(e) = self.sessions.get_mut(&id) else {
            return false;
        };
        let over_session = limits
            .max_streams_per_session
            .is_some_and(|m| e.data_streams >= m);
        let over_total = limits.max_streams_total.is_some_and(|m| total >= m);
        if over_session || over_total {
            self.stats.streams_rejected += 1;
            debug!(peer = %e.peer, over_session, over_total, "proxied stream rejected by a stream limit");
            return false;
        }
        e.data_streams += 1;
        self.data_streams_total += 1;
        true
    }

    /// A proxied stream admitted by [`Core::admit_data_stream`] ended.
    /// (When the session is gone, `kill_session` already took its streams off the total.)
    pub(crate) fn end_data_stream(&mut self, id: u64) {
        if let Some(e) = self.sessions.get_mut(&id) {
            e.data_streams = e.data_streams.saturating_sub(1);
            self.data_streams_total = self.data_streams_total.saturating_sub(1);
        }
    }

    /// Number of open streams (all sessions).
    pub fn stream_count(&self) -> usize {
        self.streams_total
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
        for e in self.sessions.values() {
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
        self.by_peer.contains_key(&(link, port, peer))
    }

    /// Registers a new session on `link` (local port `local_port`) for `peer`; returns its id. `env` is the
    /// session's own envelope when its source port differs from the link's.
    pub(crate) fn add_session(
        &mut self,
        link: u64,
        local_port: u16,
        peer: SocketAddr,
        session: Session,
        env: Option<EnvelopeBuilder>,
    ) -> u64 {
        let id = self.next_session;
        self.next_session += 1;
        let now = self.now();
        let env = match self.links.get(&link) {
            Some(l) => env.map(|e| e.with_medium(l.io.medium())),
            None => env,
        };
        let deadline = session.poll_deadline(now);
        self.sessions.insert(
            id,
            Entry {
                session,
                link,
                local_port,
                peer,
                env,
                streams: HashMap::default(),
                data_streams: 0,
                // A server session exists because its first datagram authenticated; a client's has heard
                // nothing yet.
                last_rx: (self.cfg.role == Role::Server).then_some(now),
                dirty: false,
                deadline,
                cc_window_warned: false,
            },
        );
        self.by_peer.insert((link, local_port, peer), id);
        self.stats.sessions_opened += 1;
        self.mark_dirty(id);
        id
    }

    /// Schedules a flush of session `id` by the driver.
    pub(crate) fn mark_dirty(&mut self, id: u64) {
        if let Some(e) = self.sessions.get_mut(&id) {
            if !e.dirty {
                e.dirty = true;
                self.dirty.push(id);
                self.notify.notify_one();
            }
        }
    }

    /// Registers a task-held stream (wakers) on session `id`.
    pub(crate) fn register_stream(&mut self, id: u64, sid: u32) {
        if let Some(e) = self.sessions.get_mut(&id) {
            if e.streams.insert(sid, StreamSlot::default()).is_none() {
                self.streams_total += 1;
                self.stats.streams_opened += 1;
            }
        }
    }

    /// Closes a task-held stream (FIN) and forgets it.
    pub(crate) fn release_stream(&mut self, id: u64, sid: u32) {
        if let Some(e) = self.sessions.get_mut(&id) {
            e.session.close_stream(sid);
            if e.streams.remove(&sid).is_some() {
                self.streams_total = self.streams_total.saturating_sub(1);
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
        let Some(mut e) = self.sessions.remove(&id) else {
            return;
        };
        let cc = e.session.cc_stats();
        let r = &mut self.cc_retired;
        r.bytes_sent = r.bytes_sent.saturating_add(cc.bytes_sent);
        r.bytes_delivered = r.bytes_delivered.saturating_add(cc.bytes_delivered);
        r.spurious_retrans = r.spurious_retrans.saturating_add(cc.spurious_retrans);
        e.session.close();
        self.by_peer.remove(&(e.link, e.local_port, e.peer));
        self.streams_total = self.streams_total.saturating_sub(e.streams.len());
        self.data_streams_total = self.data_streams_total.saturating_sub(e.data_streams);
        for slot in e.streams.values_mut() {
            slot.wake_all();
        }
        self.stats.sessions_closed += 1;
        if self.cfg.role == Role::Server && !self.by_peer.keys().any(|(_, _, p)| *p == e.peer) {
            // The client re-sends PTCPF at the start of any new session.
            self.peer_flags.remove(&e.peer);
        }
        info!(peer = %e.peer, conv = e.session.conv(), streams = e.streams.len(), reason = why, "session closed");
        if self.cfg.role == Role::Client {
            if let Some(l) = self.links.get(&e.link).filter(|l| !l.shared) {
                l.retire.notify_one();
            }
            self.client.session_gone(id);
        }
    }

    // ------------------------------------------------------------------------------------------------
    // TX
    // ------------------------------------------------------------------------------------------------

    /// Runs the session's timers and sends what it has; then dispatches its events.
    fn flush_session(&mut self, id: u64, now: u32, unix_secs: u64) {
        let Core {
            sessions,
            links,
            peer_flags,
            local_flags,
            guard,
            stats,
            cfg,
            ..
        } = self;
        let Some(e) = sessions.get_mut(&id) else {
            return;
        };
        e.dirty = false;
        if let Some(link) = links.get_mut(&e.link) {
            let flags = match cfg.role {
                Role::Server => peer_flags.get(&e.peer).unwrap_or(local_flags),
                Role::Client => &*local_flags,
            };
            let peer = e.peer;
            let Link { io, env4, env6, .. } = link;
            let env = match e.env.as_mut() {
                Some(own) => Some(own),
                None if peer.is_ipv4() => env4.as_mut(),
                None => env6.as_mut(),
            };
            if let Some(env) = env {
                if env.destination() != peer {
                    let _ = env.set_destination(peer);
                }
                let glen = if guard.is_some() { GUARD_LEN } else { 0 };
                let mut sent = false;
                e.session.poll_transmit(now, &mut |dgram: &[u8]| {
                    let f = flags.next();
                    let hl = env.header_len(f);
                    let total = hl + glen + dgram.len();
                    let r = io.send_with(total, &mut |buf: &mut [u8]| {
                        if let Some(g) = guard.as_mut() {
                            g.write_prefix(unix_secs, &mut buf[hl..hl + GUARD_LEN]);
                        }
                        buf[hl + glen..total].copy_from_slice(dgram);
                        env.emit(f, glen + dgram.len(), &mut buf[..total])
                            .unwrap_or(0)
                    });
                    match r {
                        Ok(()) => stats.tx_datagrams += 1,
                        Err(err) => {
                            stats.tx_errors += 1;
                            trace!(%peer, error = %err, "frame injection failed");
                        }
                    }
                    sent = true;
                });
                if sent {
                    if let Err(err) = io.flush() {
                        trace!(%peer, error = %err, "flush of injected frames failed");
                    }
                }
            }
        }
        e.deadline = e.session.poll_deadline(now);
        // Blocked writers retry after every flush (KCP may have taken smux's queue, freeing send buffer);
        // they re-register if still blocked. Readers are woken by smux's Readable/Fin events only, so idle
        // streams cost nothing here.
        for slot in e.streams.values_mut() {
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
            let Some(e) = self.sessions.get_mut(&id) else {
                return;
            };
            let Some(ev) = e.session.poll_event() else {
                break;
            };
            match ev {
                SmuxEvent::Opened(sid) => self.on_peer_opened(id, sid),
                SmuxEvent::Readable(sid) | SmuxEvent::Fin(sid) => {
                    if let Some(s) = e.streams.get_mut(&sid) {
                        if let Some(w) = s.read.take() {
                            w.wake();
                        }
                        if let Some(w) = s.write.take() {
                            w.wake();
                        }
                    }
                }
                SmuxEvent::Writable(sid) => {
                    if let Some(w) = e.streams.get_mut(&sid).and_then(|s| s.write.take()) {
                        w.wake();
                    }
                }
                SmuxEvent::Closed(err) => dead = Some(err.to_string()),
            }
        }
        if dead.is_none() {
            if let Some(e) = self.sessions.get(&id) {
                if e.session.is_dead() {
                    dead = Some("session dead".into());
                }
            }
        }
        if let Some(why) = dead {
            self.kill_session(id, &why);
        }
    }

    /// Server: the peer opened stream `sid`; apply the limits and hand it to the accept task.
    fn on_peer_opened(&mut self, id: u64, sid: u32) {
        let limits = self.cfg.limits;
        let role = self.cfg.role;
        let total = self.streams_total;
        let Some(e) = self.sessions.get_mut(&id) else {
            return;
        };
        // Proxied streams are limited once their header is read (`admit_data_stream`); here only a bound
        // on streams of any kind, so a peer opening streams without headers cannot pile them up.
        let over_session = limits
            .max_streams_per_session
            .is_some_and(|m| e.streams.len() >= m.saturating_add(PENDING_STREAM_SLACK));
        let over_total = limits
            .max_streams_total
            .is_some_and(|m| total >= m.saturating_add(PENDING_STREAM_SLACK));
        if role != Role::Server || over_session || over_total || self.accept_tx.is_none() {
            e.session.close_stream(sid);
            self.stats.streams_rejected += 1;
            debug!(peer = %e.peer, sid, over_session, over_total, "stream rejected");
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
        for e in self.sessions.values_mut() {
            let s = e.session.cc_stats();
            let conv = e.session.conv();
            if let Some(msg) = window_limited_warning(
                e.peer,
                conv,
                &s,
                &mut e.cc_window_warned,
                &mut self.cc_window_limited_total,
            ) {
                warn!(
                    peer = %e.peer,
                    window = s.window_limited_by.unwrap_or_default(),
                    bdp_segments = s.bdp_segments,
                    "{msg}"
                );
            }
            snap.add_session(e.peer, &s);
        }
        let r = self.cc_retired;
        snap.add_retired(r.bytes_sent, r.bytes_delivered, r.spurious_retrans);
        snap.window_limited_total = self.cc_window_limited_total;
        snap.finish();
        self.stats.cc = snap;
        self.cc_refreshed = Some(self.now());
    }

    /// Flushes every dirty session and every session whose deadline passed.
    pub(crate) fn service(&mut self) {
        let now = self.now();
        let unix_secs = unix_now().as_secs();
        if self
            .cc_refreshed
            .is_none_or(|t| now.wrapping_sub(t) >= CC_REFRESH_MS)
        {
            self.refresh_cc();
        }
        let mut ids = std::mem::take(&mut self.dirty);
        for (&id, e) in self.sessions.iter() {
            if !e.dirty && due(e.deadline, now) {
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
        for e in self.sessions.values() {
            let d = e.deadline.wrapping_sub(now) as i32;
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
            self.stats.rx_handed_in += 1;
            self.handle_frame(link_id, port, medium, frame, now, unix_secs);
        });
        self.router = Some(router);
        self.flush_dirty(now, unix_secs);
        n
    }

    fn handle_frame(
        &mut self,
        link_id: u64,
        port: u16,
        medium: Medium,
        frame: &mut [u8],
        now: u32,
        unix_secs: u64,
    ) {
        self.stats.rx_frames += 1;
        let want = (port != 0).then_some(port);
        let (src, dst_port, off, len) = match parse_frame_on(medium, frame, want) {
            Ok(p) => (
                p.src_addr(),
                p.dst_port,
                p.payload.as_ptr() as usize - frame.as_ptr() as usize,
                p.payload.len(),
            ),
            Err(e) => {
                self.stats.rx_bad_envelope += 1;
                trace!(reason = e.reason(), "frame dropped");
                return;
            }
        };
        if let Some(r) = self.router.as_mut() {
            let owner = r.owner(self.cfg.role, src, dst_port);
            if owner != r.index() {
                if r.hand_to(owner, frame) {
                    self.stats.rx_cross_worker += 1;
                } else {
                    self.stats.rx_handoff_drops += 1;
                }
                return;
            }
        }
        let mut payload = &mut frame[off..off + len];
        if let Some(g) = self.guard.as_mut() {
            if !g.check(unix_secs, payload) {
                self.stats.rx_guard_drops += 1;
                self.note_bad_source(src);
                trace!(%src, "guard check failed");
                return;
            }
            payload = &mut payload[GUARD_LEN..];
        }
        if self.cfg.role == Role::Client && self.cfg.server_addr != Some(src) {
            self.stats.rx_foreign += 1;
            return;
        }
        match self.by_peer.get(&(link_id, dst_port, src)).copied() {
            Some(id) => self.input_existing(id, payload, now),
            None if self.cfg.role == Role::Server => {
                self.accept_new(link_id, dst_port, src, payload, now)
            }
            None => self.stats.rx_no_session += 1,
        }
    }

    fn input_existing(&mut self, id: u64, payload: &mut [u8], now: u32) {
        let role = self.cfg.role;
        let Some(e) = self.sessions.get_mut(&id) else {
            return;
        };
        match e.session.handle_datagram(now, payload) {
            Ok(()) => {
                e.last_rx = Some(now);
                if role == Role::Client {
                    self.client.session_alive(id);
                }
            }
            Err(SessionError::Kcp(err)) => {
                self.stats.rx_session_errors += 1;
                // A new conversation from the same source (client restarted with the same port)?
                let conv = e.session.conv();
                if role == Role::Server {
                    let h = self.cfg.session.crypto.header_len();
                    let t = self.cfg.session.crypto.trailer_len();
                    if let Some((c, sn)) =
                        peek_plain_conv_sn(payload, h, t, self.cfg.session.fec_enabled())
                    {
                        if c != conv && sn == 0 {
                            let peer = e.peer;
                            info!(%peer, old = conv, new = c, "new conversation from the same source: replacing session");
                            self.stats.sessions_replaced += 1;
                            // The datagram is consumed (decrypted in place); KCP retransmits it to the new session.
                            self.kill_session(id, "replaced by a new conversation");
                            return;
                        }
                    }
                }
                trace!(conv, error = %err, "datagram rejected by KCP");
            }
            Err(SessionError::Dead) => {
                self.kill_session(id, "session dead");
                return;
            }
            Err(SessionError::Crypto(err)) => {
                self.stats.rx_crypto_failures += 1;
                trace!(error = %err, "datagram failed the crypto check");
            }
            Err(err) => {
                self.stats.rx_session_errors += 1;
                trace!(error = %err, reason = err.reason(), "datagram rejected");
                if e.session.is_dead() {
                    self.kill_session(id, &err.to_string());
                    return;
                }
            }
        }
        self.mark_dirty(id);
    }

    /// Server: an unknown source. Learn its conv from a decrypted copy and open a session.
    fn accept_new(
        &mut self,
        link_id: u64,
        local_port: u16,
        src: SocketAddr,
        payload: &mut [u8],
        now: u32,
    ) {
        if let Some(max) = self.cfg.limits.max_sessions {
            if self.sessions.len() >= max {
                self.stats.sessions_rejected += 1;
                debug!(%src, max, "new session refused: max_sessions reached");
                return;
            }
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let conv = match self.probe.open(&mut self.scratch) {
            Ok(range) => {
                let body = &self.scratch[range];
                match kcp_bytes(body, self.cfg.session.fec_enabled()) {
                    Some(k) if k.len() >= 24 => u32::from_le_bytes([k[0], k[1], k[2], k[3]]),
                    _ => {
                        self.stats.rx_no_session += 1;
                        return;
                    }
                }
            }
            Err(err) => {
                self.stats.rx_crypto_failures += 1;
                self.note_bad_source(src);
                trace!(%src, error = %err, "datagram from an unknown source failed the crypto check");
                return;
            }
        };
        let mut session = Session::new(Role::Server, conv, &self.cfg.session, now);
        if let Err(err) = session.handle_datagram(now, payload) {
            self.stats.rx_session_errors += 1;
            debug!(%src, conv, error = %err, "first datagram of a new session rejected");
            return;
        }
        info!(%src, conv, "new session");
        self.add_session(link_id, local_port, src, session, None);
    }
}

/// The KCP bytes of a decrypted body (skipping the FEC data header; FEC parity carries no KCP).
fn kcp_bytes(body: &[u8], fec: bool) -> Option<&[u8]> {
    use crate::wire::fec::{is_fec, FEC_DATA_HEADER, TYPE_DATA};
    if fec && is_fec(body) {
        let ty = u16::from_le_bytes([body[4], body[5]]);
        if ty == TYPE_DATA && body.len() >= FEC_DATA_HEADER {
            return Some(&body[FEC_DATA_HEADER..]);
        }
        return None;
    }
    Some(body)
}

/// conv and sn of the first KCP segment of a datagram already decrypted in place.
fn peek_plain_conv_sn(pkt: &[u8], header: usize, trailer: usize, fec: bool) -> Option<(u32, u32)> {
    if pkt.len() < header + trailer {
        return None;
    }
    let k = kcp_bytes(&pkt[header..pkt.len() - trailer], fec)?;
    if k.len() < 24 {
        return None;
    }
    Some((
        u32::from_le_bytes([k[0], k[1], k[2], k[3]]),
        u32::from_le_bytes([k[12], k[13], k[14], k[15]]),
    ))
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
    use crate::proto::session::SessionConfig;
    use crate::proto::smux::SmuxConfig;
    use crate::wire::crypt::BlockMode;

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
            conn: 1,
            local_flags: vec![TcpFlags::PSH_ACK],
            remote_flags: vec![],
            guard: None,
            limits: super::super::Limits::default(),
            header_timeout: Duration::from_secs(10),
        })
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
        assert_eq!(c.stats.cc, CcSnapshot::default(), "no session");
        let peer: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let mut session = Session::new(Role::Server, 0x1234, &c.cfg.session, 0);
        let sid = session.open_stream().expect("stream");
        assert!(session.write(sid, &[0x55; 4000]).expect("write") > 0);
        session.poll_transmit(10, &mut |_| {});
        let sent = session.cc_stats().bytes_sent;
        assert!(sent > 0, "the session sent data");
        let id = c.add_session(1, 9999, peer, session, None);
        c.refresh_cc();
        let cc = c.stats.cc.clone();
        assert_eq!(cc.states.iter().map(|(_, _, n)| n).sum::<u64>(), 1);
        assert_eq!(cc.bytes_sent, sent);
        assert_eq!(cc.top.len(), 1);
        assert_eq!(cc.top[0].peer, peer);
        // The snapshot the publisher builds carries it.
        let w = crate::ops::WorkerSnapshot::from_daemon(&c.stats, &crate::io::IoStats::default());
        assert_eq!(w.cc, cc);
        c.kill_session(id, "test");
        c.refresh_cc();
        assert!(
            c.stats.cc.top.is_empty() && c.stats.cc.states.is_empty(),
            "the gone session left the lists"
        );
        assert_eq!(
            c.stats.cc.bytes_sent, sent,
            "sent bytes stay counted after the session went"
        );
    }
}
