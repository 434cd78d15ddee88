//! Sans-IO smux session (xtaci/smux v1.5.x semantics, protocol versions 1 and 2; spec §3.6).
//!
//! The session is fed the peer's ordered byte stream with [`Smux::input`] (in arbitrary chunks) and hands
//! out its own byte stream with [`Smux::poll_transmit`]. Time is an injected `u32` millisecond clock
//! (wrapping). Behaviour mirrors upstream smux:
//!
//! - **Stream ids**: a client's id counter starts at 1 and a server's at 0, and each `OpenStream` adds 2
//!   *before* use, so the client's first stream is **3** (then 5, 7, …) and the server's is 2. This is why
//!   the captures start at sid 3. When the id wraps, opening fails with [`SmuxError::GoAway`].
//! - **Frames**: a version ≠ the configured one or an unknown command kills the session. PSH with length 0
//!   is ignored; PSH/FIN/UPD for an unknown (or locally closed) stream are dropped; SYN for an existing
//!   stream is ignored. (Deviation: a SYN/FIN/NOP carrying data, or a UPD whose length is not 8, is a
//!   protocol error here; upstream senders never produce either.)
//! - **v2 flow control**: the sender may have `numWritten − peerConsumed < peerWindow` bytes in flight;
//!   `peerWindow` starts at 262144 until the first UPD. The receiver queues UPD(consumed = total bytes read,
//!   window = `max_stream_buffer`) on the first read that returns data and whenever the bytes read since
//!   the last UPD reach `max_stream_buffer / 2`. A UPD claiming more consumed than written makes `write`
//!   fail with [`SmuxError::PeerConsumedTooMuch`] (upstream `ErrConsumed`).
//! - **Session receive buffer** (token bucket, `max_receive_buffer`): every PSH payload delivered to a
//!   stream takes tokens, every byte the application reads (or a close discards) returns them. While the
//!   bucket is ≤ 0, [`Smux::input`] consumes nothing more (the caller keeps the bytes in KCP, whose window
//!   then closes): this is the only bound on receive memory, as in smux. A peer that ignores our windows
//!   therefore cannot make us buffer more than `max_receive_buffer` + one frame (65535 B) of payload in
//!   total; it only stalls its own session. Likewise at most 1024 peer-opened streams may be waiting for
//!   their [`SmuxEvent::Opened`] to be polled (smux's accept backlog) before input stops.
//! - **Keepalive**: a NOP every `keepalive_interval_ms`; every `keepalive_timeout_ms` tick the session dies
//!   unless a frame arrived since the previous tick (or the bucket is exhausted, in which case smux does
//!   not close either).
//! - **Close** is a full close: queued data is still sent, then FIN, and the stream is forgotten; data
//!   arriving later is dropped. No half-close.
//!
//! Send side: bytes accepted by [`Smux::write`] are queued per stream (bounded by [`STREAM_SEND_BUFFER`] and
//! the peer window) as PSH frames of at most `max_frame_size` bytes; one write ≤ `max_frame_size` that is
//! accepted whole is exactly one frame, so datagram boundaries survive. [`Smux::poll_transmit`] emits
//! control frames (SYN, UPD, NOP) first, then serves streams round-robin one frame at a time.

use std::collections::VecDeque;

/// Stream table (looked up per frame): foldhash, randomly seeded per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use thiserror::Error;

use crate::wire::smux::{Cmd, FrameError, FrameHeader, Upd, HEADER_LEN, UPD_LEN};

/// Peer window assumed until the first UPD arrives (smux `initialPeerWindow`).
pub const INITIAL_PEER_WINDOW: u32 = 262_144;
/// Peer-opened streams whose `Opened` event is not yet polled before input stalls (smux accept backlog).
pub const ACCEPT_BACKLOG: usize = 1024;
/// Per-stream bound on bytes accepted by `write` but not yet handed to `poll_transmit`.
pub const STREAM_SEND_BUFFER: usize = 262_144;
/// Receive rings that grew above this are shrunk back when they drain.
const RING_KEEP: usize = 64 * 1024;

/// smux session settings (paqet's `smuxConf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmuxConfig {
    /// Protocol version, 1 or 2 (paqet uses 2).
    pub version: u8,
    /// NOP every this many ms.
    pub keepalive_interval_ms: u32,
    /// Session dies if no frame arrived during one such period.
    pub keepalive_timeout_ms: u32,
    /// Largest PSH payload sent (≤ 65535).
    pub max_frame_size: usize,
    /// Session receive buffer (token bucket), paqet `smuxbuf`.
    pub max_receive_buffer: usize,
    /// Per-stream window advertised in UPD, paqet `streambuf`.
    pub max_stream_buffer: usize,
}

impl Default for SmuxConfig {
    fn default() -> Self {
        SmuxConfig {
            version: 2,
            keepalive_interval_ms: 2_000,
            keepalive_timeout_ms: 8_000,
            max_frame_size: 65_535,
            max_receive_buffer: 4_194_304,
            max_stream_buffer: 2_097_152,
        }
    }
}

impl SmuxConfig {
    /// Checks the settings like smux's `VerifyConfig`.
    pub fn validate(&self) -> Result<(), SmuxError> {
        let bad = |m: &'static str| Err(SmuxError::InvalidConfig(m));
        if self.version != 1 && self.version != 2 {
            return bad("unsupported protocol version");
        }
        if self.keepalive_interval_ms == 0 {
            return bad("keep-alive interval must be positive");
        }
        if self.keepalive_timeout_ms < self.keepalive_interval_ms {
            return bad("keep-alive timeout must be larger than keep-alive interval");
        }
        if self.max_frame_size == 0 {
            return bad("max frame size must be positive");
        }
        if self.max_frame_size > 65_535 {
            return bad("max frame size must not be larger than 65535");
        }
        if self.max_receive_buffer == 0 {
            return bad("max receive buffer must be positive");
        }
        if self.max_receive_buffer > i32::MAX as usize {
            return bad("max receive buffer cannot be larger than 2147483647");
        }
        if self.max_stream_buffer == 0 {
            return bad("max stream buffer must be positive");
        }
        if self.max_stream_buffer > self.max_receive_buffer {
            return bad("max stream buffer must not be larger than max receive buffer");
        }
        Ok(())
    }
}

/// Which end of the session this is (decides stream id parity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `smux.Client`: opens odd ids starting at 3.
    Client,
    /// `smux.Server`: opens even ids starting at 2.
    Server,
}

/// smux errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SmuxError {
    /// Config rejected by [`SmuxConfig::validate`].
    #[error("invalid smux config: {0}")]
    InvalidConfig(&'static str),
    /// The peer sent a malformed frame; the session is dead.
    #[error("smux protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// No frame arrived during a keepalive timeout period; the session is dead.
    #[error("smux keepalive timeout: no frame received within {0} ms")]
    KeepaliveTimeout(u32),
    /// The session is dead (see [`Smux::dead_reason`]).
    #[error("smux session is dead")]
    SessionDead,
    /// No such open stream.
    #[error("smux stream {0} is not open")]
    UnknownStream(u32),
    /// The peer closed the stream (upstream returns EOF to writers).
    #[error("smux stream {0} was closed by the peer")]
    StreamFinished(u32),
    /// The peer's UPD claims more bytes consumed than were written (upstream `ErrConsumed`).
    #[error("smux stream {0}: peer consumed more than sent")]
    PeerConsumedTooMuch(u32),
    /// Stream ids exhausted (upstream `ErrGoAway`).
    #[error("smux stream id overflows, start a new session")]
    GoAway,
    /// A datagram does not fit one frame.
    #[error("smux stream {sid}: datagram of {len} bytes exceeds max frame size {max}")]
    DatagramTooLarge {
        /// Stream id.
        sid: u32,
        /// Datagram length.
        len: usize,
        /// `max_frame_size`.
        max: usize,
    },
}

/// Something the application should react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmuxEvent {
    /// The peer opened stream `sid`.
    Opened(u32),
    /// Stream `sid` has data to read (edge-triggered: emitted when its receive buffer goes from empty to
    /// non-empty; read until `Ok(0)`).
    Readable(u32),
    /// A write on `sid` that was refused (window or send buffer full) can now make progress.
    Writable(u32),
    /// The peer sent FIN on `sid` (data still buffered stays readable; see [`Smux::is_fin`]).
    Fin(u32),
    /// The whole session died.
    Closed(SmuxError),
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmuxStats {
    /// Frames parsed from the peer.
    pub frames_in: u64,
    /// Frames emitted.
    pub frames_out: u64,
    /// PSH payload bytes delivered to streams.
    pub bytes_in: u64,
    /// PSH payload bytes emitted.
    pub bytes_out: u64,
    /// PSH frames dropped (unknown or locally closed stream).
    pub psh_dropped: u64,
    /// Streams opened locally.
    pub streams_opened_local: u64,
    /// Streams opened by the peer.
    pub streams_opened_remote: u64,
    /// NOP frames sent.
    pub nop_sent: u64,
    /// UPD frames sent.
    pub upd_sent: u64,
    /// UPD frames received.
    pub upd_received: u64,
}

/// Queued control frame.
#[derive(Debug, Clone, Copy)]
enum Ctrl {
    Syn(u32),
    /// Window update; the value sent is the stream's latest `upd_consumed`.
    Upd(u32),
    Nop,
}

#[derive(Debug)]
struct Stream {
    /// Received payload bytes not yet read.
    recv: VecDeque<u8>,
    /// Remaining length of each received frame in `recv` (front may be partly read).
    recv_frames: VecDeque<u32>,
    /// Accepted payload bytes not yet emitted.
    send: VecDeque<u8>,
    /// Length of each queued PSH frame in `send`.
    send_frames: VecDeque<u32>,
    fin_received: bool,
    /// Closed locally: send the rest, then FIN, then forget.
    closing: bool,
    num_read: u32,
    incr: u32,
    upd_queued: bool,
    upd_consumed: u32,
    num_written: u32,
    peer_consumed: u32,
    peer_window: u32,
    write_blocked: bool,
    in_tx_ready: bool,
}

impl Stream {
    fn new() -> Self {
        Stream {
            recv: VecDeque::new(),
            recv_frames: VecDeque::new(),
            send: VecDeque::new(),
            send_frames: VecDeque::new(),
            fin_received: false,
            closing: false,
            num_read: 0,
            incr: 0,
            upd_queued: false,
            upd_consumed: 0,
            num_written: 0,
            peer_consumed: 0,
            peer_window: INITIAL_PEER_WINDOW,
            write_blocked: false,
            in_tx_ready: false,
        }
    }

    /// Bytes `write` may accept now.
    fn room(&self, sid: u32, version: u8) -> Result<usize, SmuxError> {
        let send_room = STREAM_SEND_BUFFER.saturating_sub(self.send.len());
        if version == 1 {
            return Ok(send_room);
        }
        let inflight = self.num_written.wrapping_sub(self.peer_consumed) as i32;
        if inflight < 0 {
            return Err(SmuxError::PeerConsumedTooMuch(sid));
        }
        let win = (self.peer_window as i32 as i64 - inflight as i64).max(0) as usize;
        Ok(send_room.min(win))
    }

    /// Consumes `n` bytes' worth of frame lengths from the front of `recv_frames`.
    fn consume_frames(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.recv_frames.front_mut() else {
                break;
            };
            let f = *front as usize;
            if f <= n {
                n -= f;
                self.recv_frames.pop_front();
            } else {
                *front -= n as u32;
                n = 0;
            }
        }
        if self.recv.is_empty() && self.recv.capacity() > RING_KEEP {
            self.recv.shrink_to(RING_KEEP);
        }
    }
}

/// A sans-IO smux session.
#[derive(Debug)]
pub struct Smux {
    role: Role,
    cfg: SmuxConfig,
    streams: HashMap<u32, Stream>,
    /// Streams not closed locally.
    open_count: usize,
    next_sid: u32,
    go_away: bool,
    /// Token bucket: session receive buffer left (may go negative by up to one frame).
    bucket: i64,
    ctrl: VecDeque<Ctrl>,
    nop_queued: bool,
    /// Streams with frames (or a FIN) to send, served round-robin.
    tx_ready: VecDeque<u32>,
    events: VecDeque<SmuxEvent>,
    pending_accepts: usize,
    /// Bytes of an incomplete incoming frame (header, then data).
    partial: Vec<u8>,
    dead: Option<SmuxError>,
    data_ready: bool,
    next_ping: u32,
    next_check: u32,
    stats: SmuxStats,
}

/// `a` is at or after `b` on the wrapping clock.
#[inline]
fn reached(now: u32, deadline: u32) -> bool {
    (now.wrapping_sub(deadline) as i32) >= 0
}

/// Moves `deadline` forward by whole `period`s until it is after `now` (like a Go ticker dropping ticks).
#[inline]
fn advance(deadline: u32, now: u32, period: u32) -> u32 {
    let behind = now.wrapping_sub(deadline);
    deadline.wrapping_add((behind / period + 1).wrapping_mul(period))
}

impl Smux {
    /// Creates a session. `cfg` should have passed [`SmuxConfig::validate`]; out-of-range values are
    /// clamped (frame size to 1..=65535, keepalive interval to ≥ 1 ms, timeout to ≥ interval).
    pub fn new(role: Role, mut cfg: SmuxConfig, now: u32) -> Self {
        if let Err(e) = cfg.validate() {
            tracing::warn!(error = %e, "smux config not valid; clamping");
        }
        cfg.max_frame_size = cfg.max_frame_size.clamp(1, 65_535);
        cfg.keepalive_interval_ms = cfg.keepalive_interval_ms.max(1);
        cfg.keepalive_timeout_ms = cfg.keepalive_timeout_ms.max(cfg.keepalive_interval_ms);
        cfg.max_receive_buffer = cfg.max_receive_buffer.clamp(1, i32::MAX as usize);
        cfg.max_stream_buffer = cfg.max_stream_buffer.clamp(1, i32::MAX as usize);
        Smux {
            role,
            next_sid: match role {
                Role::Client => 1,
                Role::Server => 0,
            },
            streams: HashMap::default(),
            open_count: 0,
            go_away: false,
            bucket: cfg.max_receive_buffer as i64,
            ctrl: VecDeque::new(),
            nop_queued: false,
            tx_ready: VecDeque::new(),
            events: VecDeque::new(),
            pending_accepts: 0,
            partial: Vec::new(),
            dead: None,
            data_ready: false,
            next_ping: now.wrapping_add(cfg.keepalive_interval_ms),
            next_check: now.wrapping_add(cfg.keepalive_timeout_ms),
            stats: SmuxStats::default(),
            cfg,
        }
    }

    /// This session's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The (clamped) configuration in use.
    pub fn config(&self) -> &SmuxConfig {
        &self.cfg
    }

    fn fail(&mut self, err: SmuxError) -> SmuxError {
        if self.dead.is_none() {
            tracing::debug!(error = %err, "smux session dead");
            self.dead = Some(err.clone());
            self.events.push_back(SmuxEvent::Closed(err.clone()));
            self.ctrl.clear();
            self.tx_ready.clear();
        }
        err
    }

    fn check_alive(&self) -> Result<(), SmuxError> {
        if self.dead.is_some() {
            Err(SmuxError::SessionDead)
        } else {
            Ok(())
        }
    }

    /// Feeds the peer's byte stream. Returns how many bytes were consumed: fewer than given when the
    /// session receive buffer is exhausted or the accept backlog is full (keep the rest and offer it again
    /// after reading). A protocol violation returns the error and kills the session.
    pub fn input(&mut self, _now: u32, bytes: &[u8]) -> Result<usize, SmuxError> {
        self.check_alive()?;
        let version = self.cfg.version;
        let mut used = 0;
        while used < bytes.len() {
            if self.partial.is_empty() {
                if self.bucket <= 0 || self.pending_accepts >= ACCEPT_BACKLOG {
                    break;
                }
                let rest = &bytes[used..];
                if rest.len() >= HEADER_LEN {
                    let hdr = FrameHeader::parse(rest, version).map_err(|e| self.fail(e.into()))?;
                    let total = HEADER_LEN + hdr.length as usize;
                    if rest.len() >= total {
                        self.handle_frame(hdr, &rest[HEADER_LEN..total]);
                        used += total;
                        continue;
                    }
                }
            }
            // Assemble an incomplete frame in `partial`.
            let rest = &bytes[used..];
            let have = self.partial.len();
            let want = if have < HEADER_LEN {
                HEADER_LEN
            } else {
                HEADER_LEN + u16::from_le_bytes([self.partial[2], self.partial[3]]) as usize
            };
            let take = (want - have).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            used += take;
            if self.partial.len() < HEADER_LEN {
                break;
            }
            let hdr =
                FrameHeader::parse(&self.partial, version).map_err(|e| self.fail(e.into()))?;
            self.data_ready = true; // like smux: a header counts as activity even before its data arrives
            let total = HEADER_LEN + hdr.length as usize;
            if self.partial.len() < total {
                continue; // loop again: takes more bytes if any are left
            }
            let buf = std::mem::take(&mut self.partial);
            self.handle_frame(hdr, &buf[HEADER_LEN..total]);
            self.partial = buf;
            self.partial.clear();
        }
        Ok(used)
    }

    fn handle_frame(&mut self, hdr: FrameHeader, data: &[u8]) {
        self.stats.frames_in += 1;
        self.data_ready = true;
        let sid = hdr.sid;
        match hdr.cmd {
            Cmd::Nop => {}
            Cmd::Syn => {
                if let std::collections::hash_map::Entry::Vacant(e) = self.streams.entry(sid) {
                    e.insert(Stream::new());
                    self.open_count += 1;
                    self.pending_accepts += 1;
                    self.stats.streams_opened_remote += 1;
                    self.events.push_back(SmuxEvent::Opened(sid));
                }
            }
            Cmd::Fin => {
                if let Some(s) = self.streams.get_mut(&sid) {
                    if !s.closing && !s.fin_received {
                        s.fin_received = true;
                        self.events.push_back(SmuxEvent::Fin(sid));
                    }
                }
            }
            Cmd::Psh => {
                if data.is_empty() {
                    return;
                }
                match self.streams.get_mut(&sid) {
                    Some(s) if !s.closing => {
                        let was_empty = s.recv.is_empty();
                        s.recv.extend(data); // `&[u8]` takes std's memcpy path (`.copied()` went byte by byte)
                        s.recv_frames.push_back(data.len() as u32);
                        self.bucket -= data.len() as i64;
                        self.stats.bytes_in += data.len() as u64;
                        if was_empty {
                            self.events.push_back(SmuxEvent::Readable(sid));
                        }
                    }
                    _ => {
                        tracing::trace!(
                            sid,
                            len = data.len(),
                            "smux PSH for unknown or closed stream dropped"
                        );
                        self.stats.psh_dropped += 1;
                    }
                }
            }
            Cmd::Upd => {
                self.stats.upd_received += 1;
                let Ok(upd) = Upd::parse(data) else { return };
                let version = self.cfg.version;
                if let Some(s) = self.streams.get_mut(&sid) {
                    s.peer_consumed = upd.consumed;
                    s.peer_window = upd.window;
                    if s.write_blocked
                        && !s.closing
                        && matches!(s.room(sid, version), Ok(n) if n > 0)
                    {
                        s.write_blocked = false;
                        self.events.push_back(SmuxEvent::Writable(sid));
                    }
                }
            }
        }
    }

    /// Session receive buffer left (tokens); 0 when [`Smux::input`] would consume nothing.
    pub fn receive_capacity(&self) -> usize {
        if self.dead.is_some() || self.pending_accepts >= ACCEPT_BACKLOG {
            return 0;
        }
        self.bucket.max(0) as usize
    }

    /// Opens a stream (queues its SYN) and returns its id.
    pub fn open_stream(&mut self) -> Result<u32, SmuxError> {
        self.check_alive()?;
        if self.go_away {
            return Err(SmuxError::GoAway);
        }
        let sid = self.next_sid.wrapping_add(2);
        if sid == sid % 2 {
            self.go_away = true;
            return Err(SmuxError::GoAway);
        }
        self.next_sid = sid;
        self.streams.insert(sid, Stream::new());
        self.open_count += 1;
        self.stats.streams_opened_local += 1;
        self.ctrl.push_back(Ctrl::Syn(sid));
        Ok(sid)
    }

    fn open_stream_mut(&mut self, sid: u32) -> Result<&mut Stream, SmuxError> {
        match self.streams.get_mut(&sid) {
            Some(s) if !s.closing => Ok(s),
            _ => Err(SmuxError::UnknownStream(sid)),
        }
    }

    /// Queues `data` as PSH frames; `data` must fit the room already checked.
    fn enqueue(&mut self, sid: u32, data: &[u8]) {
        let max = self.cfg.max_frame_size;
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        s.send.extend(data);
        for chunk in data.chunks(max) {
            s.send_frames.push_back(chunk.len() as u32);
        }
        s.num_written = s.num_written.wrapping_add(data.len() as u32);
        if !s.in_tx_ready {
            s.in_tx_ready = true;
            self.tx_ready.push_back(sid);
        }
    }

    /// Writes stream bytes: accepts what fits the peer window (v2) and the local send buffer, split into
    /// frames of at most `max_frame_size`. Returns the bytes accepted (0 = try again after
    /// [`SmuxEvent::Writable`]).
    pub fn write(&mut self, sid: u32, data: &[u8]) -> Result<usize, SmuxError> {
        self.check_alive()?;
        let version = self.cfg.version;
        let s = self.open_stream_mut(sid)?;
        if data.is_empty() {
            return Ok(0);
        }
        if s.fin_received {
            return Err(SmuxError::StreamFinished(sid));
        }
        let n = s.room(sid, version)?.min(data.len());
        if n < data.len() {
            s.write_blocked = true;
        }
        if n > 0 {
            self.enqueue(sid, &data[..n]);
        }
        Ok(n)
    }

    /// Writes one datagram as exactly one PSH frame, all or nothing: `Ok(false)` when it does not fit now
    /// (a [`SmuxEvent::Writable`] follows). An empty datagram sends nothing (as upstream) and returns true.
    pub fn write_datagram(&mut self, sid: u32, data: &[u8]) -> Result<bool, SmuxError> {
        self.check_alive()?;
        let version = self.cfg.version;
        let max = self.cfg.max_frame_size;
        let s = self.open_stream_mut(sid)?;
        if data.len() > max {
            return Err(SmuxError::DatagramTooLarge {
                sid,
                len: data.len(),
                max,
            });
        }
        if s.fin_received {
            return Err(SmuxError::StreamFinished(sid));
        }
        if data.is_empty() {
            return Ok(true);
        }
        if s.room(sid, version)? < data.len() {
            s.write_blocked = true;
            return Ok(false);
        }
        self.enqueue(sid, data);
        Ok(true)
    }

    /// Receive buffers now: (per-stream window we advertise, session buffer).
    pub fn receive_buffers(&self) -> (usize, usize) {
        (self.cfg.max_stream_buffer, self.cfg.max_receive_buffer)
    }

    /// Raises the per-stream window we advertise (sent with the next UPD of each stream) and the session
    /// receive buffer, for window auto-tuning; never lowers them. The session buffer stays ≥ the stream
    /// window.
    pub fn grow_receive_buffers(&mut self, stream: usize, session: usize) {
        let stream = stream.min(i32::MAX as usize);
        let session = session.max(stream).min(i32::MAX as usize);
        if session > self.cfg.max_receive_buffer {
            self.bucket += (session - self.cfg.max_receive_buffer) as i64;
            self.cfg.max_receive_buffer = session;
        }
        if stream > self.cfg.max_stream_buffer {
            self.cfg.max_stream_buffer = stream;
            if self.cfg.version == 2 {
                // Announce the larger window now: the next regular UPD only comes after half of it
                // was read, and a peer that used up the old window waits for one.
                for (sid, s) in self.streams.iter_mut() {
                    s.upd_consumed = s.num_read;
                    s.incr = 0;
                    if !s.upd_queued {
                        s.upd_queued = true;
                        self.ctrl.push_back(Ctrl::Upd(*sid));
                    }
                }
            }
        }
    }

    /// Book-keeping after the application took `n > 0` bytes from `sid`: return tokens, maybe queue UPD.
    fn after_read(&mut self, sid: u32, n: usize) {
        self.bucket += n as i64;
        if self.cfg.version != 2 {
            return;
        }
        let half = (self.cfg.max_stream_buffer / 2) as u32;
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        s.num_read = s.num_read.wrapping_add(n as u32);
        s.incr = s.incr.wrapping_add(n as u32);
        if s.incr >= half || s.num_read == n as u32 {
            s.incr = 0;
            if s.num_read != 0 {
                s.upd_consumed = s.num_read;
                if !s.upd_queued {
                    s.upd_queued = true;
                    self.ctrl.push_back(Ctrl::Upd(sid));
                }
            }
        }
    }

    /// Byte-stream read (may span frames). `Ok(0)`: nothing buffered now (check [`Smux::is_fin`] for EOF).
    pub fn read(&mut self, sid: u32, buf: &mut [u8]) -> Result<usize, SmuxError> {
        self.check_alive()?;
        let s = self.open_stream_mut(sid)?;
        let n = buf.len().min(s.recv.len());
        if n == 0 {
            return Ok(0);
        }
        let (a, b) = s.recv.as_slices();
        let from_a = n.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        s.recv.drain(..n);
        s.consume_frames(n);
        self.after_read(sid, n);
        Ok(n)
    }

    /// Takes the next frame's payload (the rest of it, if `read` took part). `None`: nothing buffered.
    pub fn read_frame(&mut self, sid: u32) -> Result<Option<Vec<u8>>, SmuxError> {
        self.check_alive()?;
        let s = self.open_stream_mut(sid)?;
        let Some(&len) = s.recv_frames.front() else {
            return Ok(None);
        };
        let len = len as usize;
        let v: Vec<u8> = s.recv.drain(..len).collect();
        s.consume_frames(len);
        self.after_read(sid, len);
        Ok(Some(v))
    }

    /// Like [`Smux::read_frame`] without allocating: copies the next frame into `buf`, dropping any part
    /// that does not fit (like a UDP socket). Returns the number of bytes copied, `None` if nothing buffered.
    pub fn read_datagram(&mut self, sid: u32, buf: &mut [u8]) -> Result<Option<usize>, SmuxError> {
        self.check_alive()?;
        let s = self.open_stream_mut(sid)?;
        let Some(&len) = s.recv_frames.front() else {
            return Ok(None);
        };
        let len = len as usize;
        let copied = len.min(buf.len());
        let (a, b) = s.recv.as_slices();
        let from_a = copied.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..copied].copy_from_slice(&b[..copied - from_a]);
        s.recv.drain(..len);
        s.consume_frames(len);
        self.after_read(sid, len);
        Ok(Some(copied))
    }

    /// Bytes buffered for reading on `sid` (0 for unknown streams).
    pub fn readable_bytes(&self, sid: u32) -> usize {
        match self.streams.get(&sid) {
            Some(s) if !s.closing => s.recv.len(),
            _ => 0,
        }
    }

    /// True when the peer sent FIN and every buffered byte has been read. Unknown (never opened, or
    /// already closed) streams count as finished.
    pub fn is_fin(&self, sid: u32) -> bool {
        match self.streams.get(&sid) {
            Some(s) if !s.closing => s.fin_received && s.recv.is_empty(),
            _ => true,
        }
    }

    /// Full close: queued data is still sent, then FIN; the stream is forgotten (unread data discarded and
    /// its tokens returned, later frames dropped). Unknown streams are ignored.
    pub fn close(&mut self, sid: u32) {
        let dead = self.dead.is_some();
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        if s.closing {
            return;
        }
        s.closing = true;
        self.open_count -= 1;
        let discarded = s.recv.len();
        s.recv = VecDeque::new();
        s.recv_frames = VecDeque::new();
        self.bucket += discarded as i64;
        if dead {
            self.streams.remove(&sid);
        } else if !s.in_tx_ready {
            s.in_tx_ready = true;
            self.tx_ready.push_back(sid);
        }
    }

    /// Next application event.
    pub fn poll_event(&mut self) -> Option<SmuxEvent> {
        let ev = self.events.pop_front();
        if let Some(SmuxEvent::Opened(_)) = ev {
            self.pending_accepts -= 1;
        }
        ev
    }

    /// Appends whole pending frames to `out`, at most `max` bytes — except that the first frame of a call
    /// is always appended even if larger, so progress is guaranteed. Control frames (SYN, UPD, NOP) go
    /// first; then streams are served round-robin, one frame each turn. Returns the bytes appended.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>, max: usize) -> usize {
        if self.dead.is_some() {
            return 0;
        }
        let start = out.len();
        let version = self.cfg.version;
        let fits = |out: &Vec<u8>, len: usize| out.len() == start || out.len() - start + len <= max;
        while let Some(&c) = self.ctrl.front() {
            let len = if matches!(c, Ctrl::Upd(_)) {
                HEADER_LEN + UPD_LEN
            } else {
                HEADER_LEN
            };
            if !fits(out, len) {
                return out.len() - start;
            }
            self.ctrl.pop_front();
            match c {
                Ctrl::Syn(sid) => FrameHeader {
                    version,
                    cmd: Cmd::Syn,
                    length: 0,
                    sid,
                }
                .emit(out),
                Ctrl::Nop => {
                    self.nop_queued = false;
                    self.stats.nop_sent += 1;
                    FrameHeader {
                        version,
                        cmd: Cmd::Nop,
                        length: 0,
                        sid: 0,
                    }
                    .emit(out)
                }
                Ctrl::Upd(sid) => {
                    let Some(s) = self.streams.get_mut(&sid) else {
                        continue;
                    };
                    s.upd_queued = false;
                    let upd = Upd {
                        consumed: s.upd_consumed,
                        window: self.cfg.max_stream_buffer as u32,
                    };
                    FrameHeader {
                        version,
                        cmd: Cmd::Upd,
                        length: UPD_LEN as u16,
                        sid,
                    }
                    .emit(out);
                    out.extend_from_slice(&upd.to_bytes());
                    self.stats.upd_sent += 1;
                }
            }
            self.stats.frames_out += 1;
        }
        while let Some(sid) = self.tx_ready.pop_front() {
            let Some(s) = self.streams.get_mut(&sid) else {
                continue;
            };
            if let Some(&flen) = s.send_frames.front() {
                let flen = flen as usize;
                if !fits(out, HEADER_LEN + flen) {
                    self.tx_ready.push_front(sid);
                    break;
                }
                FrameHeader {
                    version,
                    cmd: Cmd::Psh,
                    length: flen as u16,
                    sid,
                }
                .emit(out);
                let (a, b) = s.send.as_slices();
                let from_a = flen.min(a.len());
                out.extend_from_slice(&a[..from_a]);
                out.extend_from_slice(&b[..flen - from_a]);
                s.send.drain(..flen);
                s.send_frames.pop_front();
                self.stats.frames_out += 1;
                self.stats.bytes_out += flen as u64;
                if s.write_blocked
                    && !s.closing
                    && !s.fin_received
                    && matches!(s.room(sid, version), Ok(n) if n > 0)
                {
                    s.write_blocked = false;
                    self.events.push_back(SmuxEvent::Writable(sid));
                }
                if !s.send_frames.is_empty() || s.closing {
                    self.tx_ready.push_back(sid);
                } else {
                    s.in_tx_ready = false;
                }
            } else if s.closing {
                if !fits(out, HEADER_LEN) {
                    self.tx_ready.push_front(sid);
                    break;
                }
                FrameHeader {
                    version,
                    cmd: Cmd::Fin,
                    length: 0,
                    sid,
                }
                .emit(out);
                self.stats.frames_out += 1;
                self.streams.remove(&sid);
            } else {
                s.in_tx_ready = false;
            }
        }
        out.len() - start
    }

    /// True when [`Smux::poll_transmit`] has frames to emit.
    pub fn has_pending(&self) -> bool {
        self.dead.is_none() && (!self.ctrl.is_empty() || !self.tx_ready.is_empty())
    }

    /// Runs the keepalive timers: queues a NOP each interval and kills the session when no frame arrived
    /// during a whole timeout period (unless the receive buffer is exhausted, as smux).
    pub fn handle_timeout(&mut self, now: u32) {
        if self.dead.is_some() {
            return;
        }
        if reached(now, self.next_ping) {
            self.next_ping = advance(self.next_ping, now, self.cfg.keepalive_interval_ms);
            if !self.nop_queued {
                self.nop_queued = true;
                self.ctrl.push_back(Ctrl::Nop);
            }
        }
        if reached(now, self.next_check) {
            self.next_check = advance(self.next_check, now, self.cfg.keepalive_timeout_ms);
            if self.data_ready {
                self.data_ready = false;
            } else if self.bucket > 0 {
                self.fail(SmuxError::KeepaliveTimeout(self.cfg.keepalive_timeout_ms));
            }
        }
    }

    /// When [`Smux::handle_timeout`] next needs to run.
    pub fn next_deadline(&self) -> u32 {
        if (self.next_ping.wrapping_sub(self.next_check) as i32) < 0 {
            self.next_ping
        } else {
            self.next_check
        }
    }

    /// True once the session died (protocol error or keepalive timeout).
    pub fn is_dead(&self) -> bool {
        self.dead.is_some()
    }

    /// Why the session died.
    pub fn dead_reason(&self) -> Option<&SmuxError> {
        self.dead.as_ref()
    }

    /// Open streams (not closed locally).
    pub fn num_streams(&self) -> usize {
        self.open_count
    }

    /// Ids of the open streams (not closed locally), in no particular order.
    pub fn stream_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.streams
            .iter()
            .filter(|(_, s)| !s.closing)
            .map(|(&id, _)| id)
    }

    /// Counters.
    pub fn stats(&self) -> SmuxStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u32 = 1_000;

    /// Two sessions joined by in-memory pipes; `chunk` limits each `input` call (1 = byte by byte).
    struct Pair {
        c: Smux,
        s: Smux,
        c2s: Vec<u8>,
        s2c: Vec<u8>,
        chunk: usize,
        tx_max: usize,
    }

    impl Pair {
        fn new(cfg: SmuxConfig) -> Self {
            Pair {
                c: Smux::new(Role::Client, cfg.clone(), T0),
                s: Smux::new(Role::Server, cfg, T0),
                c2s: Vec::new(),
                s2c: Vec::new(),
                chunk: usize::MAX,
                tx_max: 16 * 1024,
            }
        }

        fn feed(dst: &mut Smux, pipe: &mut Vec<u8>, chunk: usize) -> bool {
            let mut off = 0;
            while off < pipe.len() {
                let end = pipe.len().min(off.saturating_add(chunk));
                let n = dst.input(T0, &pipe[off..end]).unwrap();
                off += n;
                if n < end - (off - n) {
                    break;
                }
            }
            pipe.drain(..off);
            off > 0
        }

        /// Moves bytes both ways until nothing moves.
        fn pump(&mut self) {
            for _ in 0..1_000_000 {
                let mut moved = false;
                while self.c.has_pending() {
                    moved |= self.c.poll_transmit(&mut self.c2s, self.tx_max) > 0;
                }
                while self.s.has_pending() {
                    moved |= self.s.poll_transmit(&mut self.s2c, self.tx_max) > 0;
                }
                moved |= Self::feed(&mut self.s, &mut self.c2s, self.chunk);
                moved |= Self::feed(&mut self.c, &mut self.s2c, self.chunk);
                if !moved {
                    return;
                }
            }
            panic!("pipes never settled");
        }
    }

    fn events(m: &mut Smux) -> Vec<SmuxEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn config_validation() {
        assert_eq!(SmuxConfig::default().validate(), Ok(()));
        let c = |f: fn(&mut SmuxConfig)| {
            let mut c = SmuxConfig::default();
            f(&mut c);
            c.validate()
        };
        assert!(
            matches!(c(|c| c.version = 3), Err(SmuxError::InvalidConfig(m)) if m.contains("version"))
        );
        assert!(c(|c| c.keepalive_interval_ms = 0).is_err());
        assert!(c(|c| c.keepalive_timeout_ms = 1_000).is_err());
        assert!(c(|c| c.max_frame_size = 0).is_err());
        assert!(c(|c| c.max_frame_size = 65_536).is_err());
        assert!(c(|c| c.max_receive_buffer = 0).is_err());
        assert!(c(|c| c.max_stream_buffer = 0).is_err());
        assert!(c(|c| c.max_stream_buffer = 8_000_000).is_err());
        assert_eq!(c(|c| c.version = 1), Ok(()));
    }

    #[test]
    fn stream_ids_match_upstream() {
        let mut c = Smux::new(Role::Client, SmuxConfig::default(), 0);
        assert_eq!(
            (c.open_stream(), c.open_stream(), c.open_stream()),
            (Ok(3), Ok(5), Ok(7))
        );
        let mut s = Smux::new(Role::Server, SmuxConfig::default(), 0);
        assert_eq!((s.open_stream(), s.open_stream()), (Ok(2), Ok(4)));
        // Overflow → GoAway, and stays so.
        c.next_sid = u32::MAX - 2;
        assert_eq!(c.open_stream(), Ok(u32::MAX));
        assert_eq!(c.open_stream(), Err(SmuxError::GoAway));
        assert_eq!(c.open_stream(), Err(SmuxError::GoAway));
    }

    /// The captures' first client frame: SYN, PSH(PTCPF), FIN for sid 3 — and the server's UPD, FIN reply.
    #[test]
    fn capture_session_start_bytes() {
        let mut c = Smux::new(Role::Client, SmuxConfig::default(), T0);
        let sid = c.open_stream().unwrap();
        assert_eq!(c.write(sid, &unhex("5001030003010018")), Ok(8));
        c.close(sid);
        assert_eq!(c.num_streams(), 0);
        let mut out = Vec::new();
        assert_eq!(c.poll_transmit(&mut out, 1 << 20), 32);
        assert_eq!(
            out,
            unhex("0200000003000000 0202080003000000 5001030003010018 0201000003000000")
        );
        assert!(!c.has_pending());

        let mut s = Smux::new(Role::Server, SmuxConfig::default(), T0);
        assert_eq!(s.input(T0, &out), Ok(32));
        assert_eq!(
            events(&mut s),
            vec![
                SmuxEvent::Opened(3),
                SmuxEvent::Readable(3),
                SmuxEvent::Fin(3)
            ]
        );
        assert!(!s.is_fin(3));
        let mut buf = [0u8; 64];
        assert_eq!(s.read(3, &mut buf), Ok(8));
        assert_eq!(&buf[..8], &unhex("5001030003010018")[..]);
        assert!(s.is_fin(3));
        assert_eq!(s.write(3, b"x"), Err(SmuxError::StreamFinished(3)));
        s.close(3);
        let mut reply = Vec::new();
        s.poll_transmit(&mut reply, 1 << 20);
        // UPD(consumed 8, window 2 MiB), then FIN.
        assert_eq!(
            reply,
            unhex("0204080003000000 08000000 00002000 0201000003000000")
        );
    }

    #[test]
    fn many_streams_bidirectional() {
        let mut p = Pair::new(SmuxConfig::default());
        let n = 24;
        let len = 300_000usize;
        let data = |sid: u32, dir: u8| -> Vec<u8> {
            (0..len)
                .map(|i| {
                    (i as u32)
                        .wrapping_mul(31)
                        .wrapping_add(sid * 7 + dir as u32) as u8
                })
                .collect()
        };
        let sids: Vec<u32> = (0..n).map(|_| p.c.open_stream().unwrap()).collect();
        p.pump();
        let opened: Vec<u32> = events(&mut p.s)
            .into_iter()
            .filter_map(|e| {
                if let SmuxEvent::Opened(x) = e {
                    Some(x)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(opened, sids);
        let mut sent_c = vec![0usize; n];
        let mut sent_s = vec![0usize; n];
        let mut got_c: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut got_s: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut buf = vec![0u8; 7_000];
        for _round in 0..10_000 {
            for (i, &sid) in sids.iter().enumerate() {
                let dc = data(sid, 0);
                if sent_c[i] < len {
                    sent_c[i] += p.c.write(sid, &dc[sent_c[i]..]).unwrap();
                }
                let ds = data(sid, 1);
                if sent_s[i] < len {
                    sent_s[i] += p.s.write(sid, &ds[sent_s[i]..]).unwrap();
                }
            }
            p.pump();
            for (i, &sid) in sids.iter().enumerate() {
                loop {
                    let k = p.s.read(sid, &mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    got_s[i].extend_from_slice(&buf[..k]);
                }
                loop {
                    let k = p.c.read(sid, &mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    got_c[i].extend_from_slice(&buf[..k]);
                }
            }
            if got_s.iter().chain(got_c.iter()).all(|g| g.len() == len) {
                break;
            }
        }
        for (i, &sid) in sids.iter().enumerate() {
            assert!(
                got_s[i] == data(sid, 0),
                "server received stream {sid} intact"
            );
            assert!(
                got_c[i] == data(sid, 1),
                "client received stream {sid} intact"
            );
        }
        assert_eq!(p.s.receive_capacity(), 4_194_304);
        assert!(p.c.stats().upd_received > 0 && p.s.stats().upd_sent > 0);
    }

    #[test]
    fn slow_reader_blocks_writer_then_resumes() {
        let mut p = Pair::new(SmuxConfig::default());
        let sid = p.c.open_stream().unwrap();
        let total = 3_000_000usize;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        // Nobody reads: the writer gets exactly the initial window and no more.
        for _ in 0..100 {
            sent += p.c.write(sid, &data[sent..]).unwrap();
            p.pump();
        }
        assert_eq!(sent, INITIAL_PEER_WINDOW as usize);
        assert_eq!(p.c.write(sid, &data[sent..]), Ok(0));
        assert_eq!(p.s.readable_bytes(sid), INITIAL_PEER_WINDOW as usize);
        assert!(!events(&mut p.c).contains(&SmuxEvent::Writable(sid)));
        // First read → UPD(consumed 1, window 2 MiB) → writer unblocked.
        let mut buf = vec![0u8; 50_000];
        assert_eq!(p.s.read(sid, &mut buf[..1]), Ok(1));
        p.pump();
        assert!(events(&mut p.c).contains(&SmuxEvent::Writable(sid)));
        let mut got = vec![buf[0]];
        let mut upds_before = p.s.stats().upd_sent;
        assert_eq!(upds_before, 1);
        let mut max_buffered = 0;
        for _ in 0..100_000 {
            if got.len() == total {
                break;
            }
            if sent < total {
                sent += p.c.write(sid, &data[sent..]).unwrap();
            }
            p.pump();
            max_buffered = max_buffered.max(p.s.readable_bytes(sid));
            let k = p.s.read(sid, &mut buf).unwrap();
            got.extend_from_slice(&buf[..k]);
            if p.s.stats().upd_sent != upds_before {
                upds_before = p.s.stats().upd_sent;
            }
        }
        assert!(got == data);
        // The receiver never held more than its advertised window.
        assert!(max_buffered <= 2_097_152, "{max_buffered}");
        // UPD every ≥ 1 MiB read: about total / 1 MiB of them, plus the first.
        assert_eq!(p.s.stats().upd_sent, 1 + (total as u64 - 1) / 1_048_576);
    }

    #[test]
    fn session_buffer_backpressure() {
        let cfg = SmuxConfig {
            max_receive_buffer: 100_000,
            max_stream_buffer: 50_000,
            ..SmuxConfig::default()
        };
        let mut p = Pair::new(cfg);
        let a = p.c.open_stream().unwrap();
        let b = p.c.open_stream().unwrap();
        let data = vec![7u8; 200_000];
        assert_eq!(
            p.c.write(a, &data),
            Ok(200_000.min(INITIAL_PEER_WINDOW as usize))
        );
        p.pump();
        // The server stopped consuming once its bucket ran out; the rest waits in the pipe.
        assert_eq!(p.s.receive_capacity(), 0);
        assert!(!p.c2s.is_empty());
        let buffered = p.s.readable_bytes(a);
        assert!(
            (100_000..100_000 + 65_535).contains(&buffered),
            "{buffered}"
        );
        // Data on another stream is stuck behind it (smux semantics), and no keepalive death while full.
        assert_eq!(p.c.write(b, b"hello"), Ok(5));
        p.pump();
        assert_eq!(p.s.readable_bytes(b), 0);
        p.s.handle_timeout(T0 + 8_000);
        p.s.handle_timeout(T0 + 16_000);
        assert!(!p.s.is_dead());
        // Reading frees tokens; the rest flows.
        let mut buf = vec![0u8; 300_000];
        let mut got = 0;
        for _ in 0..100 {
            got += p.s.read(a, &mut buf).unwrap();
            p.pump();
        }
        assert_eq!(got, 200_000);
        assert_eq!(p.s.read(b, &mut buf), Ok(5));
    }

    #[test]
    fn fin_and_close() {
        let mut p = Pair::new(SmuxConfig::default());
        let sid = p.c.open_stream().unwrap();
        p.c.write(sid, b"hello world").unwrap();
        p.c.close(sid);
        assert_eq!(p.c.write(sid, b"x"), Err(SmuxError::UnknownStream(sid)));
        p.pump();
        assert_eq!(
            events(&mut p.s),
            vec![
                SmuxEvent::Opened(sid),
                SmuxEvent::Readable(sid),
                SmuxEvent::Fin(sid)
            ]
        );
        let mut buf = [0u8; 5];
        assert!(!p.s.is_fin(sid));
        assert_eq!(p.s.read(sid, &mut buf), Ok(5));
        assert!(!p.s.is_fin(sid));
        let mut rest = [0u8; 64];
        assert_eq!(p.s.read(sid, &mut rest), Ok(6));
        assert_eq!(&rest[..6], b" world");
        assert!(p.s.is_fin(sid));
        assert_eq!(p.s.read(sid, &mut rest), Ok(0));
        assert_eq!(p.s.num_streams(), 1);
        p.s.close(sid);
        assert_eq!(p.s.num_streams(), 0);
        p.pump();
        assert_eq!(p.c.num_streams(), 0);
        assert_eq!(p.c.streams.len(), 0, "client forgot the stream");
        assert_eq!(p.s.streams.len(), 0, "server forgot the stream");

        // Late data to a closed stream is dropped without using tokens.
        let sid2 = p.c.open_stream().unwrap();
        p.pump();
        events(&mut p.s);
        p.s.close(sid2);
        p.c.write(sid2, b"late").unwrap();
        p.pump();
        assert_eq!(p.s.stats().psh_dropped, 1);
        assert_eq!(p.s.receive_capacity(), 4_194_304);
        // Unread data discarded by close returns its tokens.
        let sid3 = p.c.open_stream().unwrap();
        p.c.write(sid3, &[1u8; 1000]).unwrap();
        p.pump();
        assert_eq!(p.s.receive_capacity(), 4_194_304 - 1000);
        p.s.close(sid3);
        assert_eq!(p.s.receive_capacity(), 4_194_304);
    }

    #[test]
    fn keepalive_nop_and_timeout() {
        let mut m = Smux::new(Role::Client, SmuxConfig::default(), T0);
        assert_eq!(m.next_deadline(), T0 + 2_000);
        m.handle_timeout(T0 + 1_999);
        assert!(!m.has_pending());
        m.handle_timeout(T0 + 2_000);
        let mut out = Vec::new();
        m.poll_transmit(&mut out, 100);
        assert_eq!(out, unhex("0203000000000000"));
        assert_eq!(m.next_deadline(), T0 + 4_000);
        // A frame arrives before the first timeout tick: survives it.
        m.input(T0 + 5_000, &unhex("0203000000000000")).unwrap();
        m.handle_timeout(T0 + 8_000);
        assert!(!m.is_dead());
        // Nothing during the next period: dead at the second tick.
        m.handle_timeout(T0 + 15_999);
        assert!(!m.is_dead());
        m.handle_timeout(T0 + 16_000);
        assert!(m.is_dead());
        assert_eq!(
            events(&mut m),
            vec![SmuxEvent::Closed(SmuxError::KeepaliveTimeout(8_000))]
        );
        assert_eq!(m.open_stream(), Err(SmuxError::SessionDead));
        assert!(!m.has_pending());
        // Clock wrap-around works.
        let mut w = Smux::new(Role::Server, SmuxConfig::default(), u32::MAX - 500);
        // u32::MAX − 500 + 2000 wraps to 1499; + 8000 wraps to 7499.
        w.handle_timeout(1_498);
        assert!(!w.has_pending());
        w.handle_timeout(1_499);
        assert!(w.has_pending());
        w.handle_timeout(7_498);
        assert!(!w.is_dead());
        w.handle_timeout(7_499);
        assert!(w.is_dead());
    }

    #[test]
    fn datagram_boundaries_kept() {
        let mut p = Pair::new(SmuxConfig::default());
        p.tx_max = 1_400;
        let sid = p.c.open_stream().unwrap();
        let dgrams: Vec<Vec<u8>> = [1usize, 20, 1_000, 4_096, 65_535, 3]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        for d in &dgrams {
            assert_eq!(p.c.write_datagram(sid, d), Ok(true));
        }
        assert_eq!(
            p.c.write_datagram(sid, &[0u8; 65_536]),
            Err(SmuxError::DatagramTooLarge {
                sid,
                len: 65_536,
                max: 65_535
            })
        );
        p.pump();
        for d in &dgrams {
            assert_eq!(p.s.read_frame(sid).unwrap().as_ref(), Some(d));
        }
        assert_eq!(p.s.read_frame(sid), Ok(None));
        // read_datagram truncates like a UDP socket and drops the rest of the frame.
        p.c.write_datagram(sid, &[9u8; 5_000]).unwrap();
        p.c.write_datagram(sid, b"next").unwrap();
        p.pump();
        let mut buf = [0u8; 4_097];
        assert_eq!(p.s.read_datagram(sid, &mut buf), Ok(Some(4_097)));
        assert_eq!(p.s.read_datagram(sid, &mut buf), Ok(Some(4)));
        assert_eq!(&buf[..4], b"next");
        // All-or-nothing when the window is short.
        let sid2 = p.c.open_stream().unwrap();
        let big = vec![1u8; 65_535];
        let mut accepted = 0;
        while p.c.write_datagram(sid2, &big).unwrap() {
            accepted += 1;
            assert!(accepted < 100, "window never closed");
            p.pump();
        }
        assert_eq!(accepted, INITIAL_PEER_WINDOW as usize / 65_535);
        p.pump();
        assert_eq!(p.s.read_frame(sid2).unwrap().map(|v| v.len()), Some(65_535));
        p.pump();
        assert!(events(&mut p.c).contains(&SmuxEvent::Writable(sid2)));
        assert_eq!(p.c.write_datagram(sid2, &big), Ok(true));
    }

    #[test]
    fn large_write_splits_into_frames() {
        let mut m = Smux::new(
            Role::Client,
            SmuxConfig {
                max_frame_size: 1_000,
                ..SmuxConfig::default()
            },
            T0,
        );
        let sid = m.open_stream().unwrap();
        assert_eq!(m.write(sid, &[5u8; 2_500]), Ok(2_500));
        let mut out = Vec::new();
        m.poll_transmit(&mut out, usize::MAX);
        let mut rest = &out[..];
        let mut lens = Vec::new();
        while let Some((f, used)) = crate::wire::smux::Frame::parse(rest, 2).unwrap() {
            lens.push((f.header.cmd, f.data.len()));
            rest = &rest[used..];
        }
        assert_eq!(
            lens,
            vec![
                (Cmd::Syn, 0),
                (Cmd::Psh, 1_000),
                (Cmd::Psh, 1_000),
                (Cmd::Psh, 500)
            ]
        );
    }

    #[test]
    fn round_robin_and_max() {
        let mut m = Smux::new(Role::Client, SmuxConfig::default(), T0);
        let a = m.open_stream().unwrap();
        let b = m.open_stream().unwrap();
        for _ in 0..3 {
            m.write_datagram(a, &[0xaa; 100]).unwrap();
        }
        m.write_datagram(b, &[0xbb; 100]).unwrap();
        let mut out = Vec::new();
        // Two SYNs (16 B) + two 108-byte frames fit in 240; the third does not.
        assert_eq!(m.poll_transmit(&mut out, 240), 16 + 216);
        assert_eq!(out[16 + 4], a as u8);
        assert_eq!(out[16 + 108 + 4], b as u8);
        // A frame larger than max still goes out when it is the first of a call.
        out.clear();
        assert_eq!(m.poll_transmit(&mut out, 10), 108);
        assert_eq!(m.poll_transmit(&mut out, 10), 108);
        assert!(!m.has_pending());
    }

    #[test]
    fn protocol_errors_kill_session() {
        for bad in [
            "0100000003000000",
            "0209000003000000",
            "0204040003000000 00000000",
        ] {
            let mut m = Smux::new(Role::Server, SmuxConfig::default(), T0);
            let bytes = unhex(bad);
            // Byte by byte: the error surfaces once the header is complete.
            let mut res = Ok(0);
            for b in &bytes {
                res = m.input(T0, std::slice::from_ref(b));
                if res.is_err() {
                    break;
                }
            }
            assert!(matches!(res, Err(SmuxError::Protocol(_))), "{bad}: {res:?}");
            assert!(m.is_dead());
            assert!(matches!(
                events(&mut m)[..],
                [SmuxEvent::Closed(SmuxError::Protocol(_))]
            ));
            assert_eq!(m.input(T0, &bytes), Err(SmuxError::SessionDead));
        }
        // Unknown-stream frames are ignored, not errors.
        let mut m = Smux::new(Role::Server, SmuxConfig::default(), T0);
        let ok = unhex("0202020009000000 abcd 0201000009000000 0204080009000000 0100000000000100");
        assert_eq!(m.input(T0, &ok), Ok(ok.len()));
        assert!(!m.is_dead());
        assert_eq!(m.stats().psh_dropped, 1);
    }

    #[test]
    fn version1_session() {
        let cfg = SmuxConfig {
            version: 1,
            ..SmuxConfig::default()
        };
        let mut p = Pair::new(cfg);
        let sid = p.c.open_stream().unwrap();
        let data = vec![3u8; 600_000];
        let mut sent = 0;
        let mut got = 0;
        let mut buf = vec![0u8; 100_000];
        for _ in 0..1_000 {
            if got == data.len() {
                break;
            }
            sent += p.c.write(sid, &data[sent..]).unwrap();
            p.pump();
            got += p.s.read(sid, &mut buf).unwrap();
        }
        assert_eq!(got, data.len());
        assert_eq!(p.s.stats().upd_sent, 0);
        assert_eq!(p.c2s.first(), None);
    }

    /// Drives a client with a random op script and returns its wire bytes.
    fn scripted_stream(ops: &[(u8, u16)]) -> Vec<u8> {
        let mut c = Smux::new(Role::Client, SmuxConfig::default(), T0);
        let mut sids = Vec::new();
        let mut out = Vec::new();
        for &(op, arg) in ops {
            match op % 4 {
                0 => sids.push(c.open_stream().unwrap()),
                1 | 2 if !sids.is_empty() => {
                    let sid = sids[arg as usize % sids.len()];
                    let data: Vec<u8> = (0..arg % 3000).map(|i| i as u8 ^ op).collect();
                    let _ = c.write(sid, &data);
                }
                3 if !sids.is_empty() => {
                    let sid = sids.remove(arg as usize % sids.len());
                    c.close(sid);
                }
                _ => {}
            }
            c.poll_transmit(&mut out, arg as usize);
        }
        while c.has_pending() {
            c.poll_transmit(&mut out, usize::MAX);
        }
        out
    }

    /// Feeds `bytes` to a fresh server cut at `cuts`, reading every frame as soon as it is readable;
    /// returns the events (without `Readable`), the frames read per stream, and the counters.
    type Observed = (Vec<SmuxEvent>, Vec<(u32, Vec<u8>)>, SmuxStats);

    fn observe(bytes: &[u8], cuts: &[usize]) -> Observed {
        let mut s = Smux::new(Role::Server, SmuxConfig::default(), T0);
        let mut evs = Vec::new();
        let mut reads = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(bytes.len());
        points.sort_unstable();
        let mut off = 0;
        for p in points {
            while off < p {
                let n = s.input(T0, &bytes[off..p]).unwrap();
                off += n;
                while let Some(e) = s.poll_event() {
                    if let SmuxEvent::Readable(sid) = e {
                        while let Some(f) = s.read_frame(sid).unwrap() {
                            reads.push((sid, f));
                        }
                        // Readable is edge-triggered: how often it fires depends on when we read.
                        continue;
                    }
                    evs.push(e);
                }
            }
        }
        // Per-stream order is what matters; the interleaving across streams depends on when we read.
        reads.sort_by_key(|(sid, _)| *sid);
        (evs, reads, s.stats())
    }

    /// Real upstream bytes: the whole smux byte stream of both directions of `none.pcap` (no encryption).
    mod capture {
        use super::*;
        use crate::wire::header::Header;
        use crate::wire::smux::Frame;
        use sha2::{Digest, Sha256};
        use std::collections::BTreeMap;

        const PCAP: &str = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/testdata/upstream-alpha21/none.pcap"
        );

        /// (client→server, server→client) KCP stream bytes, PUSH data in sn order, once per sn.
        fn kcp_streams() -> Option<(Vec<u8>, Vec<u8>)> {
            let Ok(file) = std::fs::read(PCAP) else {
                eprintln!("skipping: {PCAP} not found");
                return None;
            };
            assert_eq!(
                &file[..4],
                &[0xd4, 0xc3, 0xb2, 0xa1],
                "little-endian microsecond pcap"
            );
            let mut dirs: [BTreeMap<u32, Vec<u8>>; 2] = [BTreeMap::new(), BTreeMap::new()];
            let mut off = 24;
            while off + 16 <= file.len() {
                let caplen =
                    u32::from_le_bytes(file[off + 8..off + 12].try_into().unwrap()) as usize;
                let pkt = &file[off + 16..off + 16 + caplen];
                off += 16 + caplen;
                let ip = &pkt[14..];
                let ihl = (ip[0] & 0x0f) as usize * 4;
                let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
                let tcp = &ip[ihl..total];
                let doff = (tcp[12] >> 4) as usize * 4;
                let to_server = u16::from_be_bytes([tcp[2], tcp[3]]) == 9999;
                let body = &tcp[doff..][20..]; // nonce[16] | crc32[4] | body
                let mut seg = body;
                while seg.len() >= 24 {
                    let cmd = seg[4];
                    let sn = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                    let len = u32::from_le_bytes(seg[20..24].try_into().unwrap()) as usize;
                    if cmd == 81 {
                        dirs[usize::from(!to_server)]
                            .entry(sn)
                            .or_insert_with(|| seg[24..24 + len].to_vec());
                    }
                    seg = &seg[24 + len..];
                }
            }
            let cat = |m: &BTreeMap<u32, Vec<u8>>| {
                assert!(m.keys().copied().eq(0..m.len() as u32), "contiguous sn");
                m.values().flatten().copied().collect::<Vec<u8>>()
            };
            Some((cat(&dirs[0]), cat(&dirs[1])))
        }

        /// Parses every frame, checks the re-emitted bytes are identical, counts commands, collects UPDs.
        fn frames(bytes: &[u8]) -> (BTreeMap<u8, usize>, Vec<(u32, Upd)>) {
            let mut rest = bytes;
            let mut counts = BTreeMap::new();
            let mut upds = Vec::new();
            let mut again = Vec::new();
            while let Some((f, used)) = Frame::parse(rest, 2).unwrap() {
                *counts.entry(f.header.cmd as u8).or_insert(0) += 1;
                if let Some(u) = f.upd() {
                    upds.push((f.header.sid, u));
                }
                crate::wire::smux::emit_frame(2, f.header.cmd, f.header.sid, f.data, &mut again)
                    .unwrap();
                rest = &rest[used..];
            }
            assert!(rest.is_empty(), "stream ends on a frame boundary");
            assert_eq!(again, bytes, "re-emitted frames are identical");
            (counts, upds)
        }

        #[test]
        fn none_pcap_smux_layer() {
            let Some((c2s, s2c)) = kcp_streams() else {
                return;
            };
            assert_eq!((c2s.len(), s2c.len()), (357, 65_967));
            let (cc, cu) = frames(&c2s);
            assert_eq!(cc, BTreeMap::from([(0, 7), (1, 6), (2, 7), (4, 2)]));
            let (sc, su) = frames(&s2c);
            assert_eq!(sc, BTreeMap::from([(1, 6), (2, 10), (4, 5)]));
            // Upstream's UPD rule (first read, window = streambuf) as we implement it.
            for (_, u) in cu.iter().chain(su.iter()) {
                assert_eq!(u.window, 2_097_152);
            }
            let mut su_sorted = su.clone();
            su_sorted.sort_by_key(|(sid, _)| *sid);
            let consumed: Vec<(u32, u32)> =
                su_sorted.iter().map(|(s, u)| (*s, u.consumed)).collect();
            // Upstream's server reads the 5-byte header prefix first, so its one UPD per stream (sent on
            // the first read, none later: < 1 MiB read) says consumed = 5.
            assert_eq!(consumed, vec![(3, 5), (7, 5), (9, 5), (13, 5), (15, 5)]);
            // The client's first reads: the 203-byte HTTP header frame, the 20-byte echo frame.
            let w = 2_097_152;
            assert_eq!(
                cu,
                vec![
                    (
                        9,
                        Upd {
                            consumed: 203,
                            window: w
                        }
                    ),
                    (
                        15,
                        Upd {
                            consumed: 20,
                            window: w
                        }
                    )
                ]
            );

            // Server side: feed the client's stream in awkward chunks.
            let mut s = Smux::new(Role::Server, SmuxConfig::default(), T0);
            let mut opened = Vec::new();
            let mut got: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
            for chunk in c2s.chunks(13) {
                assert_eq!(s.input(T0, chunk), Ok(chunk.len()));
                while let Some(e) = s.poll_event() {
                    match e {
                        SmuxEvent::Opened(sid) => opened.push(sid),
                        SmuxEvent::Readable(sid) => {
                            while let Some(f) = s.read_frame(sid).unwrap() {
                                got.entry(sid).or_default().push(f);
                            }
                        }
                        _ => {}
                    }
                }
            }
            assert_eq!(opened, vec![3, 5, 7, 9, 11, 13, 15]);
            let hdr = |b: &[u8]| Header::parse(b).unwrap().unwrap().0;
            for sid in [3, 7, 13] {
                assert_eq!(got[&sid].len(), 1);
                assert_eq!(hdr(&got[&sid][0]), Header::TcpFlags(vec![0x18]));
            }
            assert!(!got.contains_key(&5) && !got.contains_key(&11));
            assert_eq!(
                hdr(&got[&9][0]),
                Header::Tcp {
                    host: "127.0.0.1".into(),
                    port: 8000
                }
            );
            assert!(
                got[&9][1].starts_with(b"GET /small.bin HTTP/1.1\r\n") && got[&9][1].len() == 87
            );
            assert_eq!(
                hdr(&got[&15][0]),
                Header::Udp {
                    host: "127.0.0.1".into(),
                    port: 5300
                }
            );
            assert_eq!(got[&15][1], b"paqet-udp-probe-0001");
            for sid in [3, 5, 7, 9, 11, 13] {
                assert!(s.is_fin(sid), "sid {sid} finished");
            }
            assert!(!s.is_fin(15));

            // Client side: streams 3..=15 opened locally, then the server's stream fed byte by byte.
            let mut c = Smux::new(Role::Client, SmuxConfig::default(), T0);
            for want in [3, 5, 7, 9, 11, 13, 15] {
                assert_eq!(c.open_stream(), Ok(want));
            }
            for b in &s2c {
                assert_eq!(c.input(T0, std::slice::from_ref(b)), Ok(1));
            }
            let mut reply = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = c.read(9, &mut buf).unwrap();
                if n == 0 {
                    break;
                }
                reply.extend_from_slice(&buf[..n]);
            }
            assert_eq!(reply.len(), 65_739);
            assert!(reply.starts_with(b"HTTP/1.0 200 OK"));
            let digest = Sha256::digest(&reply[reply.len() - 65_536..]);
            assert_eq!(
                hex::encode(digest),
                "4b640d85ab3ba30fd02c9fc9db4a8928f416322ad27022ea58a65aaee68a4df2"
            );
            assert!(c.is_fin(9));
            assert_eq!(
                c.read_frame(15).unwrap().as_deref(),
                Some(&b"paqet-udp-probe-0001"[..])
            );
            assert_eq!(c.stats().psh_dropped, 0);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), chunk in 1usize..64) {
            let mut m = Smux::new(Role::Server, SmuxConfig::default(), T0);
            for c in data.chunks(chunk) {
                let Ok(n) = m.input(T0, c) else { break };
                proptest::prop_assert!(n <= c.len());
                while let Some(e) = m.poll_event() {
                    if let SmuxEvent::Readable(sid) = e {
                        let mut b = [0u8; 17];
                        while m.read(sid, &mut b).unwrap_or(0) > 0 {}
                        m.close(sid);
                    }
                }
                let mut out = Vec::new();
                m.poll_transmit(&mut out, 64);
            }
        }

        #[test]
        fn arbitrary_version2_frames_never_panic(frames in proptest::collection::vec((0u8..6, 0u32..8, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)), 0..40)) {
            let mut bytes = Vec::new();
            for (cmd, sid, data) in &frames {
                bytes.extend_from_slice(&[2, *cmd]);
                bytes.extend_from_slice(&(data.len() as u16).to_le_bytes());
                bytes.extend_from_slice(&sid.to_le_bytes());
                bytes.extend_from_slice(data);
            }
            let mut m = Smux::new(Role::Server, SmuxConfig::default(), T0);
            let _ = m.input(T0, &bytes);
            for sid in 0..8 {
                let _ = m.write(sid, b"abc");
                let _ = m.read_frame(sid);
            }
        }

        #[test]
        fn chunking_is_invisible(ops in proptest::collection::vec((proptest::prelude::any::<u8>(), proptest::prelude::any::<u16>()), 1..40),
                                 cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..30)) {
            let bytes = scripted_stream(&ops);
            let whole = observe(&bytes, &[]);
            let cut = observe(&bytes, &cuts);
            proptest::prop_assert_eq!(&whole, &cut);
            let one_by_one: Vec<usize> = (0..bytes.len()).collect();
            proptest::prop_assert_eq!(&whole, &observe(&bytes, &one_by_one));
        }
    }
}
