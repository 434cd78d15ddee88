//! Sans-IO KCP ARQ, wire- and behaviour-compatible with ikcp / kcp-go v5.6.72 (spec §3.5, §2.2).
//!
//! The caller owns the clock (`now`: wrapping `u32` milliseconds) and the socket: it feeds received KCP bytes
//! to [`Kcp::input`], queues outgoing bytes with [`Kcp::send`], reads ordered bytes with [`Kcp::recv`], and
//! calls [`Kcp::update`] after every such event and again at [`Kcp::next_deadline`]. Datagrams leave
//! through the `out` callback of [`Kcp::update`] / [`Kcp::flush`] with `reserved` free bytes in front.
//!
//! ARQ behaviour follows kcp-go: RFC 6298 RTO with `rx_minrto` 30 ms (nodelay) / 100 ms, RTO back-off
//! `+rx_rto` (normal) or `+rx_rto/2` (nodelay), fast retransmit after `resend` later ACKs (only ACKs of
//! segments sent no earlier than the missing one count: "fastack conservation"), early retransmit of any
//! segment with a pending fast-ack when no new data goes out, optional congestion window (`nocwnd`), window
//! probing (WASK after 7 s of zero remote window, back-off ×1.5 up to 120 s; WINS when our full receive queue
//! drains or when asked), and kcp-go's ACK filtering (only ACKs at or above `rcv_nxt`, plus the last one).
//!
//! Implementation differences that are invisible on the wire but matter for speed:
//! - send and receive buffers are rings indexed by `sn & mask`: an ACK or UNA is O(1) amortised instead of a
//!   scan of `snd_buf`, a received segment is placed in O(1);
//! - RTO timers live in a binary heap (lazy deletion), fast/early retransmit candidates in queues, so a
//!   flush with nothing to do is O(1), not O(window);
//! - segment payload buffers are allocated once per ring slot and reused; no per-packet allocation after
//!   warm-up;
//! - stream mode cuts the send queue into mss-sized segments when they enter the window;
//! - [`Kcp::update`] flushes immediately when new data fits the window, ACKs are due (`ack_nodelay`), a
//!   probe answer or a fast retransmit is pending, or an RTO expired — otherwise every `interval` like ikcp.
//!   (`write_delay` is carried in [`KcpConfig`] for the session; the core itself never holds data back.)
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::proto::cc::{
    new_controller, CcAlgorithm, CcConfig, CcStats, Controller, Pacer, RateSample,
};
use crate::wire::kcp::{Cmd, KcpWireError, SegmentHeader, OVERHEAD};

const RTO_NDL: u32 = 30;
const RTO_MIN: u32 = 100;
const RTO_DEF: u32 = 200;
/// Initial RTO with a congestion controller (RFC 6298's 1 s): ikcp's 200 ms fires spuriously on every
/// path with a longer RTT, and a start-up that reads those as losses leaves the path half used.
const RTO_DEF_CC: u32 = 1_000;
const RTO_MAX: u32 = 60_000;
const ASK_SEND: u8 = 1;
const ASK_TELL: u8 = 2;
/// kcp-go's initial remote window (`IKCP_WND_RCV`) until the peer's first segment tells us its own.
const INITIAL_RMT_WND: u32 = 32;
const DEAD_LINK: u32 = 20;
const THRESH_INIT: u32 = 2;
const THRESH_MIN: u32 = 2;
const PROBE_INIT: u64 = 7_000;
const PROBE_LIMIT: u64 = 120_000;
/// Smallest accepted KCP mtu (kcp-go `SetMtu` rejects < 50).
const MIN_MTU: usize = 50;
/// Largest fragment count of one message (message mode, `frg` is a u8).
const MAX_FRAGMENTS: usize = 255;
/// Bytes of Ethernet + IPv4 + TCP (with the timestamp option) around every datagram: fixed pacing rates
/// are wire rates.
const ENVELOPE_OVERHEAD: usize = 66;
/// With a congestion controller: unsent bytes KCP queues, in ms of the pacing rate (see `send_capacity`).
const UNSENT_MS: u64 = 5;
/// Largest multiple of the base reordering window after spurious retransmissions.
const REO_MULT_MAX: u32 = 16;
/// Fast retransmissions without a spurious one before the reordering window shrinks a step.
const REO_DECAY: u32 = 64;

/// KCP tuning (upstream `transport.kcp` after `aplConf`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KcpConfig {
    /// ikcp `nodelay`: minimum RTO 30 ms instead of 100 ms and gentler RTO back-off.
    pub nodelay: bool,
    /// Internal update interval in ms (clamped to 10..=5000 like kcp-go).
    pub interval: u32,
    /// Fast retransmit after this many later ACKs (0 = off).
    pub resend: u32,
    /// Disable congestion control (window = min(sndwnd, remote window)).
    pub nocwnd: bool,
    /// kcp-go `writeDelay`; informational for the session (see module doc).
    pub write_delay: bool,
    /// Flush ACKs as soon as data arrives instead of at the next interval.
    pub ack_nodelay: bool,
    /// Send window in segments (1..=65535).
    pub sndwnd: u32,
    /// Receive window in segments (1..=65535).
    pub rcvwnd: u32,
    /// KCP mtu: datagram bytes available to KCP segments (headers included), e.g. 1350 − 20.
    pub mtu: usize,
    /// Stream mode (frg always 0, writes coalesced into mss-sized segments).
    pub stream: bool,
    /// Congestion control and pacing (sender side; the wire is unchanged). [`CcConfig::OFF`] is upstream's
    /// behaviour.
    pub cc: CcConfig,
    /// Window auto-tuning: which of `sndwnd` / `rcvwnd` start at their value and grow to fit the path.
    pub autotune: Autotune,
}

/// Window auto-tuning (`sndwnd` / `rcvwnd` = `auto`): the window starts at its configured value and doubles
/// while the path needs more (send: the congestion window wants more than half of it; receive: the peer
/// fills three quarters of it while the application keeps up), never beyond `max_wnd` segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Autotune {
    pub sndwnd: bool,
    pub rcvwnd: bool,
    /// Upper bound of an auto-tuned window, segments (from `transport.kcp.window_mem` / mtu).
    pub max_wnd: u32,
}

/// Upstream `kcp.mode` names (spec §2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KcpMode {
    /// nodelay 0, interval 40, resend 2, nc 1, wdelay, no ack-nodelay.
    Normal,
    /// nodelay 0, interval 30, resend 2, nc 1, wdelay, no ack-nodelay.
    Fast,
    /// nodelay 1, interval 20, resend 2, nc 1, no wdelay, ack-nodelay.
    Fast2,
    /// nodelay 1, interval 10, resend 2, nc 1, no wdelay, ack-nodelay.
    Fast3,
    /// All values from the configuration file (zero defaults).
    Manual,
}

/// An unknown `kcp.mode` string.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown KCP mode `{0}` (expected normal, fast, fast2, fast3 or manual)")]
pub struct KcpModeParseError(pub String);

impl FromStr for KcpMode {
    type Err = KcpModeParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(KcpMode::Normal),
            "fast" => Ok(KcpMode::Fast),
            "fast2" => Ok(KcpMode::Fast2),
            "fast3" => Ok(KcpMode::Fast3),
            "manual" => Ok(KcpMode::Manual),
            other => Err(KcpModeParseError(other.to_string())),
        }
    }
}

impl fmt::Display for KcpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KcpMode::Normal => "normal",
            KcpMode::Fast => "fast",
            KcpMode::Fast2 => "fast2",
            KcpMode::Fast3 => "fast3",
            KcpMode::Manual => "manual",
        })
    }
}

impl KcpConfig {
    /// The preset of `mode` (spec §2.2) with the client defaults sndwnd 128, rcvwnd 512, KCP mtu 1330
    /// (1350 − 20 bytes of CFB header) and stream mode. `Manual` yields upstream's zero values, with the
    /// interval clamped to 10 ms as kcp-go does.
    pub fn preset(mode: KcpMode) -> Self {
        let (nodelay, interval, resend, nocwnd, write_delay, ack_nodelay) = match mode {
            KcpMode::Normal => (false, 40, 2, true, true, false),
            KcpMode::Fast => (false, 30, 2, true, true, false),
            KcpMode::Fast2 => (true, 20, 2, true, false, true),
            KcpMode::Fast3 => (true, 10, 2, true, false, true),
            KcpMode::Manual => (false, 10, 0, false, false, false),
        };
        KcpConfig {
            nodelay,
            interval,
            resend,
            nocwnd,
            write_delay,
            ack_nodelay,
            sndwnd: 128,
            rcvwnd: 512,
            mtu: 1330,
            stream: true,
            cc: CcConfig::OFF,
            autotune: Autotune::default(),
        }
    }
}

/// Errors of [`Kcp::input`]. A datagram that yields an error leaves the state machine untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum KcpError {
    /// The datagram is shorter than one segment header.
    #[error("KCP datagram of {len} bytes is shorter than one 24-byte segment header")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// A segment carries another conversation id.
    #[error("KCP segment {index} has conv {got:#010x}, this session is {expected:#010x}")]
    WrongConv {
        /// Our conv.
        expected: u32,
        /// The segment's conv.
        got: u32,
        /// Index of the segment inside the datagram.
        index: usize,
    },
    /// A segment does not decode.
    #[error("KCP segment {index}: {source}")]
    Wire {
        /// Index of the segment inside the datagram.
        index: usize,
        /// Decoder error.
        #[source]
        source: KcpWireError,
    },
}

/// Counters of one KCP conversation (kcp-go SNMP equivalents).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KcpStats {
    /// Datagrams handed to `out`.
    pub out_datagrams: u64,
    /// Datagrams accepted by `input`.
    pub in_datagrams: u64,
    /// Datagrams rejected by `input`.
    pub in_errors: u64,
    /// Segments sent (all commands, retransmissions included).
    pub out_segs: u64,
    /// Segments received (all commands).
    pub in_segs: u64,
    /// PUSH payload bytes sent (retransmissions included).
    pub out_bytes: u64,
    /// PUSH payload bytes accepted into the receive buffer (duplicates excluded).
    pub in_bytes: u64,
    /// All retransmitted segments (timeout + fast + early).
    pub retrans_segs: u64,
    /// Retransmissions because a segment's RTO expired (kcp-go `LostSegs`).
    pub lost_segs: u64,
    /// Fast retransmissions (`resend` later ACKs).
    pub fast_retrans_segs: u64,
    /// Early retransmissions (a pending fast-ack and no new data).
    pub early_retrans_segs: u64,
    /// Received PUSH segments that were duplicates or outside the window.
    pub repeat_segs: u64,
    /// ACK segments sent.
    pub acks_sent: u64,
    /// ACK segments received.
    pub acks_received: u64,
    /// Window probes (WASK) sent.
    pub wask_sent: u64,
    /// Window announcements (WINS) sent.
    pub wins_sent: u64,
}

impl KcpStats {
    /// All retransmitted segments (timeout + fast + early), i.e. [`KcpStats::retrans_segs`].
    pub fn retransmits(&self) -> u64 {
        self.retrans_segs
    }
}

/// One in-flight segment (send ring slot).
#[derive(Default)]
struct SndSlot {
    sn: u32,
    /// ts of the last transmission.
    ts: u32,
    xmit: u32,
    rto: u32,
    /// Retransmission deadline on the internal u64 clock.
    resend_at: u64,
    fastack: u32,
    frg: u8,
    /// In flight and not acknowledged.
    live: bool,
    /// The slot index is queued in `fast_q` / `early_q` (each slot is queued at most once per queue).
    in_fast_q: bool,
    in_early_q: bool,
    /// The last retransmission was a fast one (reordering-window adaptation looks at those only).
    fast_rtx: bool,
    data: Vec<u8>,
    // delivery-rate state at the last transmission (congestion control)
    sent_at: u64,
    s_delivered: u64,
    s_delivered_time: u64,
    s_first_sent: u64,
    s_app_limited: bool,
}

/// The newest-sent segment acknowledged by the ACK datagram being processed (the rate sample's packet).
#[derive(Clone, Copy)]
struct SampleSrc {
    delivered: u64,
    delivered_time: u64,
    first_sent: u64,
    sent_at: u64,
    app_limited: bool,
}

/// One receive ring slot (either in order, waiting for `recv`, or buffered out of order).
#[derive(Default)]
struct RcvSlot {
    present: bool,
    data: Vec<u8>,
}

/// A queued (not yet windowed) segment of the send queue; its bytes are at the front of `snd_bytes`.
#[derive(Clone, Copy)]
struct QueuedSeg {
    len: u32,
    frg: u8,
}

/// The KCP state machine of one conversation.
pub struct Kcp {
    conv: u32,
    mtu: usize,
    mss: usize,
    reserved: usize,
    stream: bool,
    nodelay: bool,
    interval: u32,
    fastresend: u32,
    nocwnd: bool,
    ack_nodelay: bool,
    snd_wnd: u32,
    rcv_wnd: u32,
    rmt_wnd: u32,
    cwnd: u32,
    ssthresh: u32,
    incr: u32,

    rx_srtt: i32,
    rx_rttvar: i32,
    rx_rto: u32,
    rx_minrto: u32,

    // clock: `now` extended to a monotonic u64
    clock: u64,
    last_now: u32,
    anchored: bool,
    updated: bool,
    ts_flush: u64,
    probe: u8,
    probe_wait: u64,
    ts_probe: u64,
    dead: bool,

    // send side
    snd_una: u32,
    snd_nxt: u32,
    snd_ring: Vec<SndSlot>,
    snd_mask: u32,
    snd_queue: VecDeque<QueuedSeg>,
    snd_bytes: VecDeque<u8>,
    timers: BinaryHeap<Reverse<(u64, u32, u32)>>,
    /// Slot indices whose segment may need a fast retransmit.
    fast_q: VecDeque<u32>,
    /// Slot indices whose segment may need an early retransmit.
    early_q: VecDeque<u32>,
    ack_scratch: Vec<u32>,

    // receive side
    rcv_ring: Vec<RcvSlot>,
    rcv_mask: u32,
    /// First sn not yet fully read by `recv` (head of the ikcp rcv_queue).
    read_sn: u32,
    read_off: usize,
    /// Next in-order sn expected (ikcp `rcv_nxt`): [read_sn, rcv_nxt) is the receive queue.
    rcv_nxt: u32,
    queued_bytes: usize,
    acklist: Vec<(u32, u32)>,

    obuf: Vec<u8>,
    olen: usize,
    stats: KcpStats,

    // congestion control (None = upstream's behaviour)
    cc: Option<Box<dyn Controller>>,
    cc_algorithm: CcAlgorithm,
    pacer: Pacer,
    autotune: Autotune,
    /// Payload bytes of live (sent, unacknowledged) segments.
    inflight: u64,
    /// Payload bytes acknowledged so far, and when the last were.
    delivered: u64,
    delivered_time: u64,
    first_sent_time: u64,
    /// Non-zero: samples are application-limited until `delivered` passes this mark.
    app_limited: u64,
    sample: Option<SampleSrc>,
    acked_now: u64,
    last_rate: u64,
    /// Reordering window multiplier (time-based fast retransmit) and its decay counter.
    reo_mult: u32,
    reo_clean: u32,
    spurious: u64,
    /// Highest PUSH sn received (receive-window auto-tuning).
    rcv_hi: u32,
    /// New PUSH segments received since `rcv_mark` (receive-window auto-tuning: segments per round trip).
    rcv_count: u32,
    rcv_mark: u64,
    /// Largest window the peer advertised.
    rmt_wnd_max: u32,
}

/// Wrapping "a − b" as a signed distance (ikcp `_itimediff`).
#[inline]
fn diff(a: u32, b: u32) -> i32 {
    a.wrapping_sub(b) as i32
}

impl Kcp {
    /// A new conversation. Out-of-range settings are clamped: interval 10..=5000 ms, windows 1..=65535,
    /// mtu ≥ 50. `reserved` bytes are left free in front of every emitted datagram.
    pub fn new(conv: u32, cfg: &KcpConfig, reserved: usize) -> Self {
        let mtu = cfg.mtu.max(MIN_MTU);
        let mss = mtu - OVERHEAD;
        let snd_wnd = cfg.sndwnd.clamp(1, 65_535);
        let rcv_wnd = cfg.rcvwnd.clamp(1, 65_535);
        let snd_cap = (snd_wnd as usize).next_power_of_two();
        let rcv_cap = (2 * rcv_wnd as usize).next_power_of_two();
        let mut snd_ring = Vec::with_capacity(snd_cap);
        snd_ring.resize_with(snd_cap, SndSlot::default);
        let mut rcv_ring = Vec::with_capacity(rcv_cap);
        rcv_ring.resize_with(rcv_cap, RcvSlot::default);
        Kcp {
            conv,
            mtu,
            mss,
            reserved,
            stream: cfg.stream,
            nodelay: cfg.nodelay,
            interval: cfg.interval.clamp(10, 5000),
            fastresend: cfg.resend,
            // Our controller replaces ikcp's loss-based window.
            nocwnd: cfg.nocwnd || cfg.cc.algorithm != CcAlgorithm::Off,
            ack_nodelay: cfg.ack_nodelay,
            snd_wnd,
            rcv_wnd,
            rmt_wnd: INITIAL_RMT_WND,
            cwnd: 0,
            ssthresh: THRESH_INIT,
            incr: 0,
            rx_srtt: 0,
            rx_rttvar: 0,
            rx_rto: if cfg.cc.algorithm == CcAlgorithm::Off {
                RTO_DEF
            } else {
                RTO_DEF_CC
            },
            rx_minrto: if cfg.nodelay { RTO_NDL } else { RTO_MIN },
            clock: 0,
            last_now: 0,
            anchored: false,
            updated: false,
            ts_flush: 0,
            probe: 0,
            probe_wait: 0,
            ts_probe: 0,
            dead: false,
            snd_una: 0,
            snd_nxt: 0,
            snd_ring,
            snd_mask: (snd_cap - 1) as u32,
            snd_queue: VecDeque::new(),
            snd_bytes: VecDeque::new(),
            timers: BinaryHeap::new(),
            fast_q: VecDeque::new(),
            early_q: VecDeque::new(),
            ack_scratch: Vec::new(),
            rcv_ring,
            rcv_mask: (rcv_cap - 1) as u32,
            read_sn: 0,
            read_off: 0,
            rcv_nxt: 0,
            queued_bytes: 0,
            acklist: Vec::new(),
            obuf: vec![0u8; reserved + mtu],
            olen: 0,
            stats: KcpStats::default(),
            cc: new_controller(&cfg.cc, mss, mtu + reserved + ENVELOPE_OVERHEAD),
            cc_algorithm: cfg.cc.algorithm,
            pacer: Pacer::default(),
            autotune: cfg.autotune,
            inflight: 0,
            delivered: 0,
            delivered_time: 0,
            first_sent_time: 0,
            app_limited: 0,
            sample: None,
            acked_now: 0,
            last_rate: 0,
            reo_mult: 1,
            reo_clean: 0,
            spurious: 0,
            rcv_hi: 0,
            rcv_count: 0,
            rcv_mark: 0,
            rmt_wnd_max: 0,
        }
    }

    /// Conversation id.
    pub fn conv(&self) -> u32 {
        self.conv
    }

    /// Maximum segment payload (mtu − 24).
    pub fn mss(&self) -> usize {
        self.mss
    }

    /// Segments waiting: in flight (unacknowledged) plus queued (ikcp `WaitSnd`).
    pub fn wait_snd(&self) -> usize {
        self.snd_nxt.wrapping_sub(self.snd_una) as usize + self.snd_queue.len()
    }

    /// Our receive window (segments): grows when auto-tuned.
    pub fn rcv_wnd(&self) -> u32 {
        self.rcv_wnd
    }

    /// Our send window (segments): grows when auto-tuned.
    pub fn snd_wnd(&self) -> u32 {
        self.snd_wnd
    }

    /// Current retransmission timeout (ms).
    pub fn rto(&self) -> u32 {
        self.rx_rto
    }

    /// Smoothed round-trip time (ms).
    pub fn srtt(&self) -> u32 {
        self.rx_srtt.max(0) as u32
    }

    /// The peer's last announced free receive window (segments).
    pub fn remote_window(&self) -> u32 {
        self.rmt_wnd
    }

    /// True once a segment was transmitted 20 times without being acknowledged (ikcp `state = -1`).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Counters.
    pub fn stats(&self) -> &KcpStats {
        &self.stats
    }

    /// Congestion-control and window state (for metrics and `dump`).
    pub fn cc_stats(&self) -> CcStats {
        let sent = self.stats.out_segs.max(1) as f64;
        let (btl_bw, min_rtt_ms) = self.cc.as_ref().map_or((0, 0), |c| c.model());
        let bdp_segments = if btl_bw > 0 && min_rtt_ms > 0 {
            (btl_bw * min_rtt_ms as u64 / 1000).div_ceil(self.mss as u64) as u32
        } else {
            0
        };
        let window_limited_by = if bdp_segments == 0 {
            None
        } else if !self.autotune.sndwnd && self.snd_wnd < bdp_segments {
            Some("sndwnd")
        } else if self.rmt_wnd_max > 0 && self.rmt_wnd_max < bdp_segments {
            Some("peer_rcvwnd")
        } else {
            None
        };
        CcStats {
            algorithm: self.cc_algorithm,
            state: self.cc.as_ref().map_or("off", |c| c.state()),
            pacing_rate: self.cc.as_ref().map_or(0, |c| c.pacing_rate()),
            btl_bw,
            delivery_rate: self.last_rate,
            min_rtt_ms,
            srtt_ms: self.srtt(),
            rttvar_ms: self.rx_rttvar.max(0) as u32,
            rto_ms: self.rx_rto,
            cwnd_bytes: self.cc.as_ref().map_or(u64::MAX, |c| c.cwnd()),
            inflight_bytes: self.inflight,
            sndwnd: self.snd_wnd,
            rcvwnd: self.rcv_wnd,
            rmt_wnd: self.rmt_wnd,
            bdp_segments,
            bytes_sent: self.stats.out_bytes,
            bytes_delivered: self.delivered,
            loss_ratio: self
                .stats
                .lost_segs
                .saturating_add(self.stats.fast_retrans_segs) as f64
                / sent,
            retrans_ratio: self.stats.retrans_segs as f64 / sent,
            spurious_retrans: self.spurious,
            window_limited_by,
        }
    }

    /// Extends the wrapping `now` onto the internal monotonic clock (a step backwards is ignored).
    #[inline]
    fn advance(&mut self, now: u32) {
        if !self.anchored {
            self.anchored = true;
            self.last_now = now;
            return;
        }
        let d = diff(now, self.last_now);
        if d > 0 {
            self.clock += d as u64;
            self.last_now = now;
        }
    }

    // ---------------------------------------------------------------------------------------------------
    // sending
    // ---------------------------------------------------------------------------------------------------

    fn max_queue_segs(&self) -> usize {
        2 * self.snd_wnd as usize
    }

    /// Bytes [`send`](Self::send) accepts now. The send side (in flight + queued) is bounded by
    /// `2 × sndwnd` segments: in stream mode the bound is `2 × sndwnd × mss` bytes minus `in_flight × mss`
    /// minus the bytes queued; in message mode `(2 × sndwnd − wait_snd) × mss`, at most one 255-fragment
    /// message.
    ///
    /// With a congestion controller the bytes queued but not yet sent are also bounded by
    /// [`UNSENT_MS`] of the pacing rate (at least 16 segments: twice the pacer's smallest burst, at most one congestion window), as TCP's
    /// `notsent_lowat`: the session refills the queue from smux at every flush, so the pacer never runs dry,
    /// and what the application wrote beyond that waits in smux, where streams are served round-robin. A
    /// deep queue here would delay every other stream's data (a small request during a download) by the
    /// whole queue, and spend the bulk stream's smux window on bytes not even sent.
    pub fn send_capacity(&self) -> usize {
        let in_flight = self.snd_nxt.wrapping_sub(self.snd_una) as usize;
        let cap = if self.stream {
            (self.max_queue_segs() * self.mss)
                .saturating_sub(in_flight * self.mss + self.snd_bytes.len())
        } else {
            (self
                .max_queue_segs()
                .saturating_sub(in_flight + self.snd_queue.len())
                * self.mss)
                .min(MAX_FRAGMENTS * self.mss)
        };
        match &self.cc {
            None => cap,
            Some(c) => {
                let paced = (c.pacing_rate() * UNSENT_MS / 1000)
                    .min(c.cwnd())
                    .min(1 << 30) as usize;
                let queue_max = paced.max(16 * self.mss);
                cap.min(queue_max.saturating_sub(self.snd_queue.len() * self.mss))
            }
        }
    }

    /// Queues bytes for sending; takes at most [`send_capacity`](Self::send_capacity) bytes and returns how
    /// many it took. Stream mode appends to the last queued segment while it is shorter than mss; message
    /// mode makes the accepted bytes one message (fragments counted down in `frg`).
    pub fn send(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.send_capacity());
        if n == 0 {
            return 0;
        }
        let mut rest = &data[..n];
        self.snd_bytes.extend(rest.iter());
        if self.stream {
            if let Some(last) = self.snd_queue.back_mut() {
                let room = self.mss - last.len as usize;
                let take = room.min(rest.len());
                last.len += take as u32;
                rest = &rest[take..];
            }
            while !rest.is_empty() {
                let take = rest.len().min(self.mss);
                self.snd_queue.push_back(QueuedSeg {
                    len: take as u32,
                    frg: 0,
                });
                rest = &rest[take..];
            }
        } else {
            let count = n.div_ceil(self.mss).max(1);
            for i in 0..count {
                let take = rest.len().min(self.mss);
                self.snd_queue.push_back(QueuedSeg {
                    len: take as u32,
                    frg: (count - i - 1) as u8,
                });
                rest = &rest[take..];
            }
        }
        n
    }

    #[inline]
    fn effective_cwnd(&self) -> u32 {
        let mut c = self.snd_wnd.min(self.rmt_wnd);
        if !self.nocwnd {
            c = c.min(self.cwnd.max(1));
        }
        c
    }

    /// New data is queued and the windows (ARQ and congestion) have room.
    #[inline]
    fn can_send_new(&self) -> bool {
        !self.snd_queue.is_empty()
            && self.snd_nxt.wrapping_sub(self.snd_una) < self.effective_cwnd()
            && self.cc_window_open()
    }

    /// The congestion controller lets one more segment into flight (always, without one).
    #[inline]
    fn cc_window_open(&self) -> bool {
        self.cc.as_ref().is_none_or(|c| self.inflight < c.cwnd())
    }

    /// The pacer lets a data segment leave at `clock` (always without a controller).
    #[inline]
    fn pace_ready_at(&self, clock: u64) -> bool {
        match &self.cc {
            None => true,
            Some(c) => self.pacer.tokens_at(clock, c.pacing_rate(), self.mss) >= 0.0,
        }
    }

    /// Within a flush (after the pacer's refill): may another data segment leave?
    #[inline]
    fn pace_budget(&self) -> bool {
        self.cc.is_none() || self.pacer.ready()
    }

    /// Base reordering window of the time-based fast retransmit (ms): a quarter of the min RTT (at least
    /// 1 ms), times the multiplier raised by spurious retransmissions, at most the smoothed RTT.
    fn reo_wnd(&self) -> u32 {
        let min_rtt = self.cc.as_ref().map_or(0, |c| c.model().1);
        let base = if min_rtt > 0 { min_rtt } else { self.srtt() };
        ((base / 4).max(1) * self.reo_mult).min(self.srtt().max(1))
    }

    /// Doubles-up the send window (auto-tuning) to `wnd` segments, re-indexing the send ring.
    fn grow_snd_wnd(&mut self, wnd: u32) {
        let wnd = wnd.min(65_535);
        if wnd <= self.snd_wnd {
            return;
        }
        self.snd_wnd = wnd;
        let cap = (wnd as usize).next_power_of_two();
        if cap <= self.snd_ring.len() {
            return;
        }
        let old = std::mem::take(&mut self.snd_ring);
        let mask = (cap - 1) as u32;
        let requeue = |q: &VecDeque<u32>| -> Vec<u32> {
            q.iter()
                .filter(|&&i| old[i as usize].live)
                .map(|&i| old[i as usize].sn & mask)
                .collect()
        };
        let fast: Vec<u32> = requeue(&self.fast_q);
        let early: Vec<u32> = requeue(&self.early_q);
        let mut ring = Vec::with_capacity(cap);
        ring.resize_with(cap, SndSlot::default);
        for slot in old.into_iter().filter(|s| s.live) {
            let idx = (slot.sn & mask) as usize;
            ring[idx] = slot;
        }
        self.snd_ring = ring;
        self.snd_mask = mask;
        self.fast_q = fast.into();
        self.early_q = early.into();
    }

    /// Grows the receive window (auto-tuning) to `wnd` segments, re-indexing the receive ring.
    fn grow_rcv_wnd(&mut self, wnd: u32) {
        let wnd = wnd.min(65_535);
        if wnd <= self.rcv_wnd {
            return;
        }
        self.rcv_wnd = wnd;
        let cap = (2 * wnd as usize).next_power_of_two();
        if cap <= self.rcv_ring.len() {
            return;
        }
        let mut old = std::mem::take(&mut self.rcv_ring);
        let old_mask = self.rcv_mask;
        let mask = (cap - 1) as u32;
        let mut ring = Vec::with_capacity(cap);
        ring.resize_with(cap, RcvSlot::default);
        // Every present slot holds an sn in [read_sn, read_sn + old capacity).
        for i in 0..old.len() as u32 {
            let sn = self.read_sn.wrapping_add(i);
            let slot = std::mem::take(&mut old[(sn & old_mask) as usize]);
            if slot.present {
                ring[(sn & mask) as usize] = slot;
            }
        }
        self.rcv_ring = ring;
        self.rcv_mask = mask;
    }

    // ---------------------------------------------------------------------------------------------------
    // receiving
    // ---------------------------------------------------------------------------------------------------

    /// Ordered bytes waiting to be read.
    pub fn readable(&self) -> usize {
        self.queued_bytes - self.read_off
    }

    #[inline]
    fn nrcv_que(&self) -> u32 {
        self.rcv_nxt.wrapping_sub(self.read_sn)
    }

    #[inline]
    fn wnd_unused(&self) -> u16 {
        let q = self.nrcv_que();
        if q < self.rcv_wnd {
            (self.rcv_wnd - q).min(u16::MAX as u32) as u16
        } else {
            0
        }
    }

    /// Moves buffered in-order segments into the receive queue (ikcp rcv_buf → rcv_queue).
    #[inline]
    fn promote(&mut self) {
        while self.nrcv_que() < self.rcv_wnd {
            let slot = &self.rcv_ring[(self.rcv_nxt & self.rcv_mask) as usize];
            if !slot.present {
                break;
            }
            self.queued_bytes += slot.data.len();
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
        }
    }

    /// Copies ordered bytes into `buf` (stream semantics: fragment boundaries are ignored). Returns 0 when
    /// nothing is available.
    pub fn recv(&mut self, buf: &mut [u8]) -> usize {
        let was_full = self.nrcv_que() >= self.rcv_wnd;
        let mut n = 0;
        while self.read_sn != self.rcv_nxt {
            let idx = (self.read_sn & self.rcv_mask) as usize;
            let slot = &mut self.rcv_ring[idx];
            let avail = slot.data.len() - self.read_off;
            let take = avail.min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&slot.data[self.read_off..self.read_off + take]);
            n += take;
            self.read_off += take;
            if self.read_off == slot.data.len() {
                self.queued_bytes -= slot.data.len();
                slot.present = false;
                slot.data.clear();
                self.read_off = 0;
                self.read_sn = self.read_sn.wrapping_add(1);
            } else {
                break;
            }
        }
        self.promote();
        if was_full && self.nrcv_que() < self.rcv_wnd {
            self.probe |= ASK_TELL;
        }
        n
    }

    // ---------------------------------------------------------------------------------------------------
    // input
    // ---------------------------------------------------------------------------------------------------

    /// Feeds one datagram's KCP bytes (one or more segments). The whole datagram is validated first (every
    /// segment decodes and carries our conv); on error nothing is applied. Trailing bytes shorter than a
    /// header are ignored, as kcp-go does.
    pub fn input(&mut self, now: u32, data: &[u8]) -> Result<(), KcpError> {
        if let Err(e) = self.validate(data) {
            self.stats.in_errors += 1;
            return Err(e);
        }
        self.advance(now);
        self.stats.in_datagrams += 1;
        let old_una = self.snd_una;
        let prior_inflight = self.inflight;
        self.sample = None;
        self.acked_now = 0;
        let mut have_ack = false;
        let mut latest: u32 = 0;
        self.ack_scratch.clear();
        let mut rest = data;
        while rest.len() >= OVERHEAD {
            let Ok((h, payload, next)) = SegmentHeader::parse(rest) else {
                break;
            };
            rest = next;
            self.stats.in_segs += 1;
            self.rmt_wnd = h.wnd as u32;
            self.rmt_wnd_max = self.rmt_wnd_max.max(self.rmt_wnd);
            self.parse_una(h.una);
            match h.cmd {
                Cmd::Ack => {
                    self.stats.acks_received += 1;
                    self.parse_ack(h.sn, h.ts);
                    self.ack_scratch.push(h.sn);
                    if !have_ack || diff(h.ts, latest) > 0 {
                        latest = h.ts;
                    }
                    have_ack = true;
                }
                Cmd::Push => {
                    if diff(h.sn, self.rcv_nxt.wrapping_add(self.rcv_wnd)) < 0 {
                        self.acklist.push((h.sn, h.ts));
                        if diff(h.sn, self.rcv_nxt) >= 0 {
                            if diff(h.sn, self.rcv_hi) > 0 {
                                self.rcv_hi = h.sn;
                            }
                            self.rcv_count = self.rcv_count.saturating_add(1);
                            self.store(h.sn, payload);
                        } else {
                            self.stats.repeat_segs += 1;
                        }
                    } else {
                        self.stats.repeat_segs += 1;
                    }
                }
                Cmd::Wask => self.probe |= ASK_TELL,
                Cmd::Wins => {}
            }
        }
        let mut rtt_sample = None;
        if have_ack {
            let rtt = diff(self.last_now, latest);
            if rtt >= 0 {
                self.update_rtt(rtt);
                rtt_sample = Some(rtt as u32);
            }
            self.parse_fastack(latest);
        }
        if self.acked_now > 0 {
            self.on_rate_sample(prior_inflight, rtt_sample);
        }
        if self.autotune.rcvwnd && self.rcv_wnd < self.autotune.max_wnd {
            // The peer fills three quarters of our window while the application keeps up: double it. Filled
            // means either out-of-order data spanning that much (holes being repaired), or that much
            // arriving within one round trip (a loss-free sender held by our window sends one window per
            // round trip). The RTT is ours (from our own data's ACKs: smux keepalives at least), 100 ms
            // before the first sample.
            let span = self.rcv_hi.wrapping_sub(self.read_sn).wrapping_add(1);
            let filled = self.rcv_wnd / 4 * 3;
            let period = if self.rx_srtt > 0 {
                self.rx_srtt as u64
            } else {
                100
            };
            let per_rtt = self.rcv_count >= filled;
            if self.clock >= self.rcv_mark + period || per_rtt {
                self.rcv_count = 0;
                self.rcv_mark = self.clock;
            }
            if ((diff(self.rcv_hi, self.read_sn) >= 0 && span >= filled) || per_rtt)
                && self.nrcv_que() <= self.rcv_wnd / 4
            {
                self.grow_rcv_wnd((self.rcv_wnd * 2).min(self.autotune.max_wnd));
            }
        }
        if !self.nocwnd && diff(self.snd_una, old_una) > 0 && self.cwnd < self.rmt_wnd {
            let mss = self.mss as u32;
            if self.cwnd < self.ssthresh {
                self.cwnd += 1;
                self.incr += mss;
            } else {
                if self.incr < mss {
                    self.incr = mss;
                }
                self.incr += (mss * mss) / self.incr + mss / 16;
                if (self.cwnd + 1) * mss <= self.incr {
                    self.cwnd += 1;
                }
            }
            if self.cwnd > self.rmt_wnd {
                self.cwnd = self.rmt_wnd;
                self.incr = self.rmt_wnd * mss;
            }
        }
        Ok(())
    }

    fn validate(&self, data: &[u8]) -> Result<(), KcpError> {
        if data.len() < OVERHEAD {
            return Err(KcpError::TooShort { len: data.len() });
        }
        let mut rest = data;
        let mut index = 0;
        while rest.len() >= OVERHEAD {
            let (h, _, next) =
                SegmentHeader::parse(rest).map_err(|source| KcpError::Wire { index, source })?;
            if h.conv != self.conv {
                return Err(KcpError::WrongConv {
                    expected: self.conv,
                    got: h.conv,
                    index,
                });
            }
            rest = next;
            index += 1;
        }
        Ok(())
    }

    /// Stores a PUSH payload with `rcv_nxt <= sn < rcv_nxt + rcv_wnd`.
    fn store(&mut self, sn: u32, payload: &[u8]) {
        let slot = &mut self.rcv_ring[(sn & self.rcv_mask) as usize];
        if slot.present {
            self.stats.repeat_segs += 1;
            return;
        }
        slot.present = true;
        slot.data.clear();
        slot.data.extend_from_slice(payload);
        self.stats.in_bytes += payload.len() as u64;
        if sn == self.rcv_nxt {
            self.promote();
        }
    }

    /// Drops the acknowledged head of the send ring (everything below the first live slot).
    #[inline]
    fn shrink(&mut self) {
        while self.snd_una != self.snd_nxt
            && !self.snd_ring[(self.snd_una & self.snd_mask) as usize].live
        {
            self.snd_una = self.snd_una.wrapping_add(1);
        }
    }

    /// Cumulative acknowledgement: every sn below `una` is delivered.
    fn parse_una(&mut self, una: u32) {
        if diff(una, self.snd_una) <= 0 {
            return;
        }
        let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
        let upto = una.wrapping_sub(self.snd_una).min(in_flight);
        for i in 0..upto {
            let sn = self.snd_una.wrapping_add(i);
            let idx = (sn & self.snd_mask) as usize;
            if self.snd_ring[idx].live {
                self.on_delivered(idx);
            }
        }
        self.snd_una = self.snd_una.wrapping_add(upto);
        self.shrink();
    }

    /// Selective acknowledgement of one sn; `ts` is the echoed timestamp of the transmission it acknowledges.
    fn parse_ack(&mut self, sn: u32, ts: u32) {
        if sn.wrapping_sub(self.snd_una) >= self.snd_nxt.wrapping_sub(self.snd_una) {
            return;
        }
        let idx = (sn & self.snd_mask) as usize;
        let slot = &self.snd_ring[idx];
        if slot.live && slot.sn == sn {
            if slot.xmit > 1 && diff(ts, slot.ts) < 0 && self.cc.is_some() {
                // An earlier transmission arrived: the last retransmission was spurious. If it was a fast
                // one, reordering outlasted the window: widen it (a DSACK-less version of RACK's
                // adaptation). Timeouts say nothing about reordering (a lost ACK causes most of them).
                self.spurious += 1;
                if slot.fast_rtx {
                    self.reo_mult = (self.reo_mult + 1).min(REO_MULT_MAX);
                    self.reo_clean = 0;
                }
                let len = slot.data.len() as u64;
                if let Some(c) = self.cc.as_mut() {
                    c.on_spurious(len);
                }
            }
            self.on_delivered(idx);
            self.shrink();
        }
    }

    /// A live segment was acknowledged: count it delivered and keep it as the rate sample's packet if it
    /// is the newest sent so far in this ACK datagram.
    fn on_delivered(&mut self, idx: usize) {
        let slot = &mut self.snd_ring[idx];
        slot.live = false;
        let len = slot.data.len() as u64;
        self.inflight = self.inflight.saturating_sub(len);
        self.delivered += len;
        self.acked_now += len;
        self.delivered_time = self.clock;
        if self.cc.is_some() {
            let newer = self.sample.is_none_or(|b| {
                slot.s_delivered > b.delivered
                    || (slot.s_delivered == b.delivered && slot.sent_at > b.sent_at)
            });
            if newer {
                self.sample = Some(SampleSrc {
                    delivered: slot.s_delivered,
                    delivered_time: slot.s_delivered_time,
                    first_sent: slot.s_first_sent,
                    sent_at: slot.sent_at,
                    app_limited: slot.s_app_limited,
                });
            }
        }
    }

    /// Builds the delivery-rate sample of this ACK datagram and feeds the controller; auto-tunes the send
    /// window from the controller's window.
    fn on_rate_sample(&mut self, prior_inflight: u64, rtt_ms: Option<u32>) {
        let Some(p) = self.sample.take() else { return };
        let Some(cc) = self.cc.as_mut() else { return };
        let send_elapsed = p.sent_at.saturating_sub(p.first_sent);
        let ack_elapsed = self.delivered_time.saturating_sub(p.delivered_time);
        self.first_sent_time = p.sent_at;
        if self.app_limited != 0 && self.delivered > self.app_limited {
            self.app_limited = 0;
        }
        let rs = RateSample {
            delivered: self.delivered,
            prior_delivered: p.delivered,
            delivered_in_interval: self.delivered - p.delivered,
            interval_ms: send_elapsed.max(ack_elapsed).max(1),
            acked: self.acked_now,
            rtt_ms,
            app_limited: p.app_limited,
            prior_inflight,
            inflight: self.inflight,
        };
        self.last_rate = rs.rate();
        cc.on_ack(self.clock, &rs);
        if self.autotune.sndwnd && self.snd_wnd < self.autotune.max_wnd {
            let want =
                (2 * cc.cwnd() / self.mss as u64).min(u64::from(self.autotune.max_wnd)) as u32;
            if want > self.snd_wnd {
                self.grow_snd_wnd(want.next_power_of_two().min(self.autotune.max_wnd));
            }
        }
    }

    /// Fast-ack accounting for the ACKs of one datagram: every live segment below an acknowledged sn and
    /// sent no later than the newest acknowledged transmission (`latest`) gains one fast-ack per such ACK.
    fn parse_fastack(&mut self, latest: u32) {
        let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
        let una = self.snd_una;
        // distances of the in-window acks, ascending
        self.ack_scratch.retain_mut(|sn| {
            let d = sn.wrapping_sub(una);
            *sn = d;
            d < in_flight
        });
        if self.ack_scratch.is_empty() {
            return;
        }
        self.ack_scratch.sort_unstable();
        let max_d = *self.ack_scratch.last().unwrap_or(&0);
        let resent = if self.fastresend == 0 {
            u32::MAX
        } else {
            self.fastresend
        };
        let mut j = 0; // acks[..j] have distance <= d
        let total = self.ack_scratch.len();
        // With a congestion controller, fast retransmit is also time-based (RACK-like): a later segment sent
        // at least the reordering window after this one was acknowledged, so reordering alone (jitter on
        // the path) does not trigger it. Early retransmit is upstream's only.
        let (paced, reo) = match self.cc {
            Some(_) => (true, self.reo_wnd() as i32),
            None => (false, 0),
        };
        for d in 0..max_d {
            while j < total && self.ack_scratch[j] <= d {
                j += 1;
            }
            let idx = una.wrapping_add(d) & self.snd_mask;
            let slot = &mut self.snd_ring[idx as usize];
            if !slot.live || diff(slot.ts, latest) > 0 {
                continue;
            }
            slot.fastack = slot.fastack.saturating_add((total - j) as u32);
            if slot.fastack > 0 && !slot.in_early_q && !paced {
                slot.in_early_q = true;
                self.early_q.push_back(idx);
            }
            if paced && diff(latest, slot.ts) < reo {
                continue;
            }
            if slot.fastack >= resent && !slot.in_fast_q {
                slot.in_fast_q = true;
                self.fast_q.push_back(idx);
            }
        }
    }

    fn update_rtt(&mut self, rtt: i32) {
        if self.rx_srtt == 0 {
            self.rx_srtt = rtt;
            self.rx_rttvar = rtt >> 1;
        } else {
            let mut delta = rtt - self.rx_srtt;
            self.rx_srtt += delta >> 3;
            if delta < 0 {
                delta = -delta;
            }
            if rtt < self.rx_srtt - self.rx_rttvar {
                self.rx_rttvar += (delta - self.rx_rttvar) >> 5;
            } else {
                self.rx_rttvar += (delta - self.rx_rttvar) >> 2;
            }
        }
        let srtt = self.rx_srtt.max(0) as u32;
        let mut margin = self.interval.max((self.rx_rttvar.max(0) as u32) << 2);
        if self.cc.is_some() {
            // With a congestion controller the time-based fast retransmit finds losses within an RTT plus
            // the reordering window; the timeout is for tail losses and must not race it (paced senders
            // also probe with a standing queue of up to a quarter BDP, start-up with more): at least
            // 2 × srtt.
            margin = margin.max(srtt);
        }
        let rto = srtt.saturating_add(margin);
        self.rx_rto = rto.clamp(self.rx_minrto, RTO_MAX);
    }

    // ---------------------------------------------------------------------------------------------------
    // output
    // ---------------------------------------------------------------------------------------------------

    /// Hands the pending datagram to `out` (if any).
    #[inline]
    fn emit_pending(&mut self, out: &mut dyn FnMut(&mut [u8])) {
        if self.olen > 0 {
            out(&mut self.obuf[..self.reserved + self.olen]);
            self.stats.out_datagrams += 1;
            self.olen = 0;
        }
    }

    /// Appends a data-less segment (ACK, WASK, WINS).
    #[inline]
    fn push_ctrl(&mut self, cmd: Cmd, sn: u32, ts: u32, wnd: u16, out: &mut dyn FnMut(&mut [u8])) {
        if self.olen + OVERHEAD > self.mtu {
            self.emit_pending(out);
        }
        let h = SegmentHeader {
            conv: self.conv,
            cmd,
            frg: 0,
            wnd,
            ts,
            sn,
            una: self.rcv_nxt,
            len: 0,
        };
        let at = self.reserved + self.olen;
        h.emit(&mut self.obuf[at..]);
        self.olen += OVERHEAD;
        self.stats.out_segs += 1;
    }

    /// (Re)transmits the send slot of `sn` with fresh ts/wnd/una and arms its RTO timer.
    fn transmit(&mut self, sn: u32, wnd: u16, out: &mut dyn FnMut(&mut [u8])) {
        let idx = (sn & self.snd_mask) as usize;
        let len = self.snd_ring[idx].data.len();
        if self.olen + OVERHEAD + len > self.mtu {
            self.emit_pending(out);
        }
        let now = self.last_now;
        let una = self.rcv_nxt;
        let slot = &mut self.snd_ring[idx];
        if slot.xmit == 0 {
            if self.inflight == 0 {
                // A fresh flight: the rate sample's intervals start now.
                self.first_sent_time = self.clock;
                self.delivered_time = self.clock;
            }
            self.inflight += len as u64;
        }
        slot.sent_at = self.clock;
        slot.s_delivered = self.delivered;
        slot.s_delivered_time = self.delivered_time;
        slot.s_first_sent = self.first_sent_time;
        slot.s_app_limited = self.app_limited != 0;
        if self.cc.is_some() {
            self.pacer.spend(len + OVERHEAD);
        }
        slot.xmit += 1;
        slot.ts = now;
        let h = SegmentHeader {
            conv: self.conv,
            cmd: Cmd::Push,
            frg: slot.frg,
            wnd,
            ts: now,
            sn,
            una,
            len: len as u32,
        };
        let at = self.reserved + self.olen;
        h.emit(&mut self.obuf[at..]);
        self.obuf[at + OVERHEAD..at + OVERHEAD + len].copy_from_slice(&slot.data);
        self.olen += OVERHEAD + len;
        if slot.xmit >= DEAD_LINK {
            self.dead = true;
        }
        self.timers.push(Reverse((slot.resend_at, sn, slot.xmit)));
        self.stats.out_segs += 1;
        self.stats.out_bytes += len as u64;
    }

    /// The ring index of `sn` if that segment is in flight and unacknowledged.
    #[inline]
    fn live_slot(&self, sn: u32) -> Option<usize> {
        let idx = (sn & self.snd_mask) as usize;
        let s = &self.snd_ring[idx];
        (s.live
            && s.sn == sn
            && sn.wrapping_sub(self.snd_una) < self.snd_nxt.wrapping_sub(self.snd_una))
        .then_some(idx)
    }

    /// Without `ack_nodelay` (modes normal and fast), ACKs still leave as soon as this many are pending
    /// rather than waiting for the next interval: timing is not part of the wire, and holding a whole
    /// window's ACKs for up to `interval` ms is what capped upstream's throughput in these modes. One
    /// datagram carries up to ~55 ACKs, so this batches them without stalling the sender.
    fn eager_ack_batch(&self) -> usize {
        ((self.rcv_wnd as usize) / 4).clamp(1, 32)
    }

    /// Something must go out now (new data fits the window, ACKs with ack_nodelay, a probe answer, a fast
    /// retransmit, an expired RTO or window probe).
    fn urgent(&self) -> bool {
        self.urgent_ctrl() || (self.data_due() && self.pace_ready_at(self.clock))
    }

    /// Control segments are due (ACKs, probe answers, window probes): never paced.
    fn urgent_ctrl(&self) -> bool {
        self.probe != 0
            || (self.ack_nodelay && !self.acklist.is_empty())
            || self.acklist.len() >= self.eager_ack_batch()
            || (self.rmt_wnd == 0 && self.probe_wait != 0 && self.clock >= self.ts_probe)
    }

    /// Data segments are due (new data fits the windows, a fast retransmit, an expired RTO).
    fn data_due(&self) -> bool {
        self.can_send_new()
            || !self.fast_q.is_empty()
            || self
                .timers
                .peek()
                .is_some_and(|Reverse((at, _, _))| *at <= self.clock)
    }

    /// Sends everything due now: ACKs, window probes, retransmissions (timeout, fast, early) and new data
    /// as far as the window allows. Each datagram is `buf[..reserved]` (free) + KCP segments (≤ mtu bytes).
    pub fn flush(&mut self, now: u32, out: &mut dyn FnMut(&mut [u8])) {
        self.flush_impl(now, true, out);
    }

    /// The flush. `tick` = an interval flush (ikcp semantics, early retransmit allowed); the eager flushes
    /// [`update`](Self::update) runs between ticks skip early retransmit, so that an ACK merely reordered on
    /// the path does not trigger a spurious resend before the rest of its flight arrives.
    fn flush_impl(&mut self, now: u32, tick: bool, out: &mut dyn FnMut(&mut [u8])) {
        self.advance(now);
        if !self.updated {
            self.updated = true;
            self.ts_flush = self.clock;
        }
        let wnd = self.wnd_unused();
        let ts_now = self.last_now;

        // acknowledgements (kcp-go: only those at/above rcv_nxt, plus the last one)
        if !self.acklist.is_empty() {
            let acks = std::mem::take(&mut self.acklist);
            let last = acks.len() - 1;
            for (i, &(sn, ts)) in acks.iter().enumerate() {
                if diff(sn, self.rcv_nxt) >= 0 || i == last {
                    self.push_ctrl(Cmd::Ack, sn, ts, wnd, out);
                    self.stats.acks_sent += 1;
                }
            }
            self.acklist = acks;
            self.acklist.clear();
        }

        // window probing
        if self.rmt_wnd == 0 {
            if self.probe_wait == 0 {
                self.probe_wait = PROBE_INIT;
                self.ts_probe = self.clock + self.probe_wait;
            } else if self.clock >= self.ts_probe {
                self.probe_wait = self.probe_wait.max(PROBE_INIT);
                self.probe_wait = (self.probe_wait + self.probe_wait / 2).min(PROBE_LIMIT);
                self.ts_probe = self.clock + self.probe_wait;
                self.probe |= ASK_SEND;
            }
        } else {
            self.probe_wait = 0;
            self.ts_probe = 0;
        }
        if self.probe & ASK_SEND != 0 {
            self.push_ctrl(Cmd::Wask, 0, ts_now, wnd, out);
            self.stats.wask_sent += 1;
        }
        if self.probe & ASK_TELL != 0 {
            self.push_ctrl(Cmd::Wins, 0, ts_now, wnd, out);
            self.stats.wins_sent += 1;
        }
        self.probe = 0;

        let cwnd = self.effective_cwnd();
        let new_possible = self.can_send_new();
        if let Some(c) = &self.cc {
            self.pacer.refill(self.clock, c.pacing_rate(), self.mss);
        }
        let resent = if self.fastresend == 0 {
            u32::MAX
        } else {
            self.fastresend
        };
        let mut change = 0u32;
        let mut lost = 0u32;

        // RTO expiries
        while let Some(&Reverse((at, sn, xmit))) = self.timers.peek() {
            if at > self.clock || !self.pace_budget() {
                break;
            }
            self.timers.pop();
            let Some(idx) = self.live_slot(sn) else {
                continue;
            };
            if self.snd_ring[idx].xmit != xmit {
                continue; // retransmitted since: a newer timer exists
            }
            let step = if self.nodelay {
                self.rx_rto / 2
            } else {
                self.rx_rto
            };
            let slot = &mut self.snd_ring[idx];
            slot.rto = slot.rto.saturating_add(step);
            slot.resend_at = self.clock + slot.rto as u64;
            slot.fast_rtx = false;
            let len = slot.data.len() as u64;
            if let Some(c) = self.cc.as_mut() {
                c.on_loss(self.clock, len, self.inflight);
            }
            self.transmit(sn, wnd, out);
            lost += 1;
            self.stats.lost_segs += 1;
            self.stats.retrans_segs += 1;
        }

        // fast retransmit
        while self.pace_budget() {
            let Some(i) = self.fast_q.pop_front() else {
                break;
            };
            let idx = i as usize;
            let slot = &mut self.snd_ring[idx];
            slot.in_fast_q = false;
            if !slot.live || slot.fastack < resent {
                continue;
            }
            let sn = slot.sn;
            let len = slot.data.len() as u64;
            slot.fast_rtx = true;
            if let Some(c) = self.cc.as_mut() {
                c.on_loss(self.clock, len, self.inflight);
                self.reo_clean += 1;
                if self.reo_clean >= REO_DECAY {
                    self.reo_clean = 0;
                    self.reo_mult = (self.reo_mult - 1).max(1);
                }
            }
            self.rearm(idx);
            self.transmit(sn, wnd, out);
            change += 1;
            self.stats.fast_retrans_segs += 1;
            self.stats.retrans_segs += 1;
        }

        // early retransmit (only when no new data goes out, like kcp-go, and only on interval ticks)
        if tick && !new_possible && self.cc.is_none() {
            while let Some(i) = self.early_q.pop_front() {
                let idx = i as usize;
                let slot = &mut self.snd_ring[idx];
                slot.in_early_q = false;
                if !slot.live || slot.fastack == 0 {
                    continue;
                }
                let sn = slot.sn;
                self.rearm(idx);
                self.transmit(sn, wnd, out);
                change += 1;
                self.stats.early_retrans_segs += 1;
                self.stats.retrans_segs += 1;
            }
        }

        // new data
        while !self.snd_queue.is_empty()
            && self.snd_nxt.wrapping_sub(self.snd_una) < cwnd
            && self.cc_window_open()
            && self.pace_budget()
        {
            let q = self
                .snd_queue
                .pop_front()
                .unwrap_or(QueuedSeg { len: 0, frg: 0 });
            let sn = self.snd_nxt;
            self.snd_nxt = sn.wrapping_add(1);
            let idx = (sn & self.snd_mask) as usize;
            let rto = self.rx_rto;
            let clock = self.clock;
            let len = q.len as usize;
            let slot = &mut self.snd_ring[idx];
            slot.data.clear();
            let (a, b) = self.snd_bytes.as_slices();
            let from_a = len.min(a.len());
            slot.data.extend_from_slice(&a[..from_a]);
            slot.data.extend_from_slice(&b[..len - from_a]);
            self.snd_bytes.drain(..len);
            slot.sn = sn;
            slot.frg = q.frg;
            slot.xmit = 0;
            slot.fastack = 0;
            slot.live = true;
            slot.rto = rto;
            slot.resend_at = clock + rto as u64;
            self.transmit(sn, wnd, out);
        }
        if self.snd_queue.is_empty() && self.cc_window_open() {
            // Nothing more to send although the window has room: the samples that follow measure the
            // application, not the path.
            self.app_limited = (self.delivered + self.inflight).max(1);
        }
        self.emit_pending(out);

        if self.timers.len() > 4 * self.snd_ring.len() + 64 {
            let (ring, mask) = (&self.snd_ring, self.snd_mask);
            self.timers.retain(|Reverse((_, sn, xmit))| {
                let s = &ring[(sn & mask) as usize];
                s.live && s.sn == *sn && s.xmit == *xmit
            });
        }

        // congestion window (only matters without nocwnd)
        if change > 0 {
            let inflight = self.snd_nxt.wrapping_sub(self.snd_una);
            self.ssthresh = (inflight / 2).max(THRESH_MIN);
            self.cwnd = self.ssthresh.saturating_add(resent);
            self.incr = self.cwnd.saturating_mul(self.mss as u32);
        }
        if lost > 0 {
            self.ssthresh = (cwnd / 2).max(THRESH_MIN);
            self.cwnd = 1;
            self.incr = self.mss as u32;
        }
        if self.cwnd < 1 {
            self.cwnd = 1;
            self.incr = self.mss as u32;
        }
    }

    /// Resets a slot's fast-ack count and RTO after a fast/early retransmission decision.
    #[inline]
    fn rearm(&mut self, idx: usize) {
        let rto = self.rx_rto;
        let clock = self.clock;
        let slot = &mut self.snd_ring[idx];
        slot.fastack = 0;
        slot.rto = rto;
        slot.resend_at = clock + rto as u64;
    }

    /// Call after every `input`/`send`/`recv` and at [`next_deadline`](Self::next_deadline): flushes when the
    /// interval elapsed (ikcp `update`) or when something is urgent (see module doc).
    pub fn update(&mut self, now: u32, out: &mut dyn FnMut(&mut [u8])) {
        self.advance(now);
        if !self.updated {
            self.updated = true;
            self.ts_flush = self.clock;
        }
        if self.clock.abs_diff(self.ts_flush) >= 10_000 {
            self.ts_flush = self.clock;
        }
        if self.clock >= self.ts_flush {
            self.ts_flush += self.interval as u64;
            if self.clock >= self.ts_flush {
                self.ts_flush = self.clock + self.interval as u64;
            }
            self.flush_impl(now, true, out);
        } else if self.urgent() {
            self.flush_impl(now, false, out);
        }
    }

    /// When [`update`](Self::update) next has work (ikcp `check`): `now` if something is urgent, else the
    /// earliest of the next interval tick, RTO expiry and window probe.
    pub fn next_deadline(&self, now: u32) -> u32 {
        let d = diff(now, self.last_now);
        if !self.updated || d < 0 || self.urgent() {
            return now;
        }
        let clock = self.clock + d as u64;
        let mut at = self.ts_flush;
        if let Some(c) = &self.cc {
            if self.data_due() {
                // Only the pacer holds data back: wake when it releases the next segment.
                at = at.min(self.pacer.release_at(self.clock, c.pacing_rate(), self.mss));
            }
        }
        if let Some(Reverse((t, _, _))) = self.timers.peek() {
            at = at.min(*t);
        }
        if self.rmt_wnd == 0 && self.probe_wait != 0 {
            at = at.min(self.ts_probe);
        }
        if at <= clock {
            return now;
        }
        now.wrapping_add((at - clock).min(i32::MAX as u64) as u32)
    }
}

/// Fuzz entry point: feeds arbitrary bytes to a fresh conversation (conv taken from the bytes so that the
/// segment path is reached), then exercises flush/recv/send. Must never panic.
pub fn fuzz_input(data: &[u8]) {
    // Upstream's ARQ, and the congestion-controlled one with auto-tuned windows (ring re-indexing).
    for cc in [CcConfig::OFF, CcConfig::BBR] {
        let mut cfg = KcpConfig::preset(KcpMode::Fast3);
        cfg.sndwnd = 8;
        cfg.rcvwnd = 8;
        cfg.cc = cc;
        if cc.algorithm != CcAlgorithm::Off {
            cfg.autotune = Autotune {
                sndwnd: true,
                rcvwnd: true,
                max_wnd: 64,
            };
        }
        fuzz_one(data, &cfg);
    }
}

fn fuzz_one(data: &[u8], cfg: &KcpConfig) {
    let conv = crate::wire::kcp::peek_conv(data).unwrap_or(0);
    let mut k = Kcp::new(conv, cfg, 4);
    let mut sink = |b: &mut [u8]| {
        assert!(b.len() <= 4 + 1330);
    };
    let _ = k.input(1, data);
    k.update(2, &mut sink);
    let _ = k.send(data);
    let _ = k.input(40, data);
    k.flush(50, &mut sink);
    let mut buf = [0u8; 2048];
    while k.recv(&mut buf) > 0 {}
    let _ = k.next_deadline(60);
    k.update(5000, &mut sink);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// A lossy, reordering, duplicating one-way link with a seeded RNG.
    struct Link {
        rng: SmallRng,
        loss: f64,
        dup: f64,
        base: u64,
        jitter: u64,
        seq: u64,
        q: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>>,
    }

    impl Link {
        /// `jitter` > 0 reorders datagrams; duplication (1%) only happens together with jitter.
        fn new(seed: u64, loss: f64, jitter: u64) -> Self {
            let dup = if jitter > 0 { 0.01 } else { 0.0 };
            Link {
                rng: SmallRng::seed_from_u64(seed),
                loss,
                dup,
                base: 20,
                jitter,
                seq: 0,
                q: BinaryHeap::new(),
            }
        }
        fn send(&mut self, t: u64, reserved: usize, d: &[u8]) {
            let copies = if self.rng.gen_bool(self.dup) { 2 } else { 1 };
            for _ in 0..copies {
                if self.rng.gen_bool(self.loss) {
                    continue;
                }
                let at = t + self.base + self.rng.gen_range(0..=self.jitter);
                self.seq += 1;
                self.q.push(Reverse((at, self.seq, d[reserved..].to_vec())));
            }
        }
        fn next_at(&self) -> Option<u64> {
            self.q.peek().map(|Reverse((at, _, _))| *at)
        }
        fn pop_due(&mut self, t: u64) -> Option<Vec<u8>> {
            if self.next_at()? <= t {
                self.q.pop().map(|Reverse((_, _, d))| d)
            } else {
                None
            }
        }
    }

    fn pattern(dir: u8, i: u64) -> u8 {
        (i.wrapping_mul(31) ^ (i >> 9) ^ (dir as u64 * 0x5a)) as u8
    }

    /// One endpoint of the simulation: its KCP, bytes written and bytes verified.
    struct End {
        kcp: Kcp,
        dir: u8,
        sent: u64,
        got: u64,
        reading: bool,
    }

    impl End {
        fn write(&mut self, total: u64, scratch: &mut Vec<u8>) {
            while self.sent < total {
                let cap = self.kcp.send_capacity() as u64;
                if cap == 0 {
                    break;
                }
                let n = cap.min(total - self.sent).min(50_000);
                scratch.clear();
                scratch.extend((self.sent..self.sent + n).map(|i| pattern(self.dir, i)));
                let took = self.kcp.send(scratch) as u64;
                assert_eq!(took, n, "send must take what send_capacity allowed");
                self.sent += took;
            }
        }
        fn read(&mut self, peer_dir: u8, buf: &mut [u8]) {
            if !self.reading {
                return;
            }
            loop {
                let avail = self.kcp.readable();
                let n = self.kcp.recv(buf);
                assert_eq!(n, avail.min(buf.len()));
                if n == 0 {
                    break;
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(
                        *b,
                        pattern(peer_dir, self.got + k as u64),
                        "byte {} corrupted",
                        self.got + k as u64
                    );
                }
                self.got += n as u64;
            }
        }
    }

    struct Sim {
        a: End,
        b: End,
        ab: Link,
        ba: Link,
        t: u64,
        start: u32,
    }

    const RESERVED: usize = 3;

    impl Sim {
        fn new(cfg: &KcpConfig, seed: u64, loss: f64) -> Self {
            let conv = 0x1234_5678;
            Sim {
                a: End {
                    kcp: Kcp::new(conv, cfg, RESERVED),
                    dir: 1,
                    sent: 0,
                    got: 0,
                    reading: true,
                },
                b: End {
                    kcp: Kcp::new(conv, cfg, RESERVED),
                    dir: 2,
                    sent: 0,
                    got: 0,
                    reading: true,
                },
                ab: Link::new(seed, loss, 15),
                ba: Link::new(seed ^ 0xdead_beef, loss, 15),
                t: 0,
                // start near the u32 wrap so that the clock wraps during every run
                start: u32::MAX - 5_000,
            }
        }
        fn now(&self) -> u32 {
            self.start.wrapping_add(self.t as u32)
        }
        fn update_both(&mut self) {
            let (now, t) = (self.now(), self.t);
            let ab = &mut self.ab;
            self.a.kcp.update(now, &mut |d: &mut [u8]| {
                assert!(d.len() <= RESERVED + 1330 && d.len() > RESERVED + 23);
                ab.send(t, RESERVED, d)
            });
            let ba = &mut self.ba;
            self.b
                .kcp
                .update(now, &mut |d: &mut [u8]| ba.send(t, RESERVED, d));
        }

        /// Runs until both directions moved `total_ab` / `total_ba` bytes; `pause` = (from, to) virtual ms
        /// during which b does not read.
        fn run(&mut self, total_ab: u64, total_ba: u64, pause: Option<(u64, u64)>) {
            let mut scratch = Vec::new();
            let mut buf = vec![0u8; 70_000];
            let mut same_t = 0u32;
            loop {
                if let Some((from, to)) = pause {
                    self.b.reading = !(self.t >= from && self.t < to);
                }
                self.a.write(total_ab, &mut scratch);
                self.b.write(total_ba, &mut scratch);
                self.a.read(2, &mut buf);
                self.b.read(1, &mut buf);
                self.update_both();
                if self.a.got == total_ba
                    && self.b.got == total_ab
                    && self.a.kcp.wait_snd() == 0
                    && self.b.kcp.wait_snd() == 0
                {
                    break;
                }
                assert!(
                    self.t < 3_600_000,
                    "transfer stalled: a got {} b got {}",
                    self.a.got,
                    self.b.got
                );
                let now = self.now();
                let mut next = u64::MAX;
                for k in [&self.a.kcp, &self.b.kcp] {
                    let d = diff(k.next_deadline(now), now);
                    assert!(d >= 0, "next_deadline in the past");
                    next = next.min(self.t + d as u64);
                }
                for l in [&self.ab, &self.ba] {
                    if let Some(at) = l.next_at() {
                        next = next.min(at);
                    }
                }
                if let Some((from, to)) = pause {
                    for edge in [from, to] {
                        if edge > self.t {
                            next = next.min(edge);
                        }
                    }
                }
                if next <= self.t {
                    same_t += 1;
                    assert!(same_t < 1000, "livelock: next_deadline keeps returning now");
                } else {
                    same_t = 0;
                    self.t = next;
                }
                let now = self.now();
                while let Some(d) = self.ab.pop_due(self.t) {
                    self.b.kcp.input(now, &d).expect("valid datagram");
                    self.b.read(1, &mut buf);
                }
                while let Some(d) = self.ba.pop_due(self.t) {
                    self.a.kcp.input(now, &d).expect("valid datagram");
                    self.a.read(2, &mut buf);
                }
            }
        }
    }

    const MIB: u64 = 1 << 20;

    fn transfer(mode: KcpMode, loss: f64, seed: u64) -> Sim {
        let cfg = KcpConfig::preset(mode);
        let mut sim = Sim::new(&cfg, seed, loss);
        sim.run(8 * MIB, 8 * MIB, None);
        for e in [&sim.a, &sim.b] {
            let s = e.kcp.stats();
            assert!(s.out_bytes >= 8 * MIB);
            if loss > 0.0 {
                assert!(
                    s.retrans_segs > 0,
                    "losses must cause retransmissions: {s:?}"
                );
            }
            assert_eq!(e.kcp.wait_snd(), 0);
            assert!(!e.kcp.is_dead());
        }
        sim
    }

    #[test]
    fn bulk_fast_no_loss() {
        let sim = transfer(KcpMode::Fast, 0.0, 1);
        assert_eq!(sim.a.kcp.stats().lost_segs, 0);
    }
    #[test]
    fn bulk_fast_5pct() {
        transfer(KcpMode::Fast, 0.05, 2);
    }
    #[test]
    fn bulk_fast_20pct() {
        let sim = transfer(KcpMode::Fast, 0.20, 3);
        let s = sim.a.kcp.stats();
        assert!(
            s.lost_segs > 0 && s.fast_retrans_segs + s.early_retrans_segs > 0,
            "{s:?}"
        );
    }
    #[test]
    fn clean_link_has_no_retransmissions() {
        for mode in [
            KcpMode::Fast,
            KcpMode::Fast3,
            KcpMode::Normal,
            KcpMode::Fast2,
        ] {
            let cfg = KcpConfig::preset(mode);
            let mut sim = Sim::new(&cfg, 12, 0.0);
            sim.ab = Link::new(1, 0.0, 0);
            sim.ba = Link::new(2, 0.0, 0);
            sim.run(2 * MIB, MIB, None);
            for e in [&sim.a, &sim.b] {
                let s = e.kcp.stats();
                assert_eq!(s.retrans_segs, 0, "{mode}: {s:?}");
                assert_eq!(s.repeat_segs, 0, "{mode}: {s:?}");
                assert!(
                    (e.kcp.srtt() as i64 - 40).abs() <= 45,
                    "{mode}: srtt {}",
                    e.kcp.srtt()
                );
            }
        }
    }

    #[test]
    fn bulk_fast3_no_loss() {
        transfer(KcpMode::Fast3, 0.0, 4);
    }
    #[test]
    fn bulk_fast3_5pct() {
        transfer(KcpMode::Fast3, 0.05, 5);
    }
    #[test]
    fn bulk_fast3_20pct() {
        transfer(KcpMode::Fast3, 0.20, 6);
    }

    #[test]
    fn congestion_control_and_message_mode() {
        let mut cfg = KcpConfig::preset(KcpMode::Manual);
        cfg.stream = false;
        let mut sim = Sim::new(&cfg, 7, 0.05);
        sim.run(MIB, MIB / 2, None);
        assert!(sim.a.kcp.stats().retrans_segs > 0);
    }

    #[test]
    fn zero_window_probe_and_resume() {
        let mut cfg = KcpConfig::preset(KcpMode::Fast3);
        cfg.rcvwnd = 64;
        let mut sim = Sim::new(&cfg, 8, 0.0);
        // b stops reading from 100 ms to 30 s: a must see a zero window, probe with WASK, and resume.
        sim.run(4 * MIB, 0, Some((100, 30_000)));
        let (sa, sb) = (sim.a.kcp.stats(), sim.b.kcp.stats());
        assert!(
            sa.wask_sent >= 2,
            "sender must probe the zero window: {sa:?}"
        );
        assert!(
            sb.wins_sent >= 1,
            "receiver must announce its reopened window: {sb:?}"
        );
        assert!(sim.t > 30_000);
    }

    #[test]
    fn window_probe_answered_with_wins() {
        // a WINS lost on the way: only the WASK probe reopens the window
        let mut cfg = KcpConfig::preset(KcpMode::Fast3);
        cfg.rcvwnd = 16;
        let mut sim = Sim::new(&cfg, 9, 0.0);
        sim.run(200_000, 0, Some((50, 20_000)));
        assert!(sim.a.kcp.stats().wask_sent >= 1);
    }

    /// fast.pcap's first body (captures README): one PUSH of 32 smux bytes.
    const FAST_BODY: &str = "63942f555100000252000000000000000000000020000000\
        0200000003000000020208000300000050010300030100180201000003000000";

    #[test]
    fn golden_capture_input_and_ack() {
        let body = hex::decode(FAST_BODY).unwrap();
        let cfg = KcpConfig::preset(KcpMode::Fast);
        let mut k = Kcp::new(0x552f_9463, &cfg, 0);
        k.input(1000, &body).unwrap();
        assert_eq!(k.readable(), 32);
        let mut buf = [0u8; 64];
        assert_eq!(k.recv(&mut buf), 32);
        assert_eq!(&buf[..32], &body[24..]);
        let mut out = Vec::new();
        k.flush(1001, &mut |d: &mut [u8]| out.push(d.to_vec()));
        assert_eq!(out.len(), 1);
        let (h, data, rest) = SegmentHeader::parse(&out[0]).unwrap();
        assert!(data.is_empty() && rest.is_empty());
        assert_eq!(
            (h.conv, h.cmd, h.sn, h.ts, h.una, h.wnd),
            (0x552f_9463, Cmd::Ack, 0, 0x52, 1, 512)
        );
        // wrong conv is rejected
        let other = Kcp::new(1, &cfg, 0).conv();
        let mut k2 = Kcp::new(other, &cfg, 0);
        assert!(matches!(
            k2.input(0, &body),
            Err(KcpError::WrongConv {
                expected: 1,
                got: 0x552f_9463,
                index: 0
            })
        ));
    }

    #[test]
    fn bad_tail_rejects_whole_datagram() {
        let body = hex::decode(FAST_BODY).unwrap();
        let cfg = KcpConfig::preset(KcpMode::Fast3);
        let mut k = Kcp::new(0x552f_9463, &cfg, 0);
        let mut d = body.clone();
        d.extend_from_slice(&body);
        d[24 + 32 + 4] = 99;
        assert!(matches!(
            k.input(0, &d),
            Err(KcpError::Wire {
                index: 1,
                source: KcpWireError::UnknownCmd { cmd: 99 }
            })
        ));
        assert_eq!(k.readable(), 0);
        assert!(matches!(
            k.input(0, &body[..20]),
            Err(KcpError::TooShort { len: 20 })
        ));
        k.input(0, &body).unwrap();
        assert_eq!(k.readable(), 32);
        assert_eq!(k.stats().in_errors, 2);
    }

    #[test]
    fn send_capacity_bounds_queue() {
        let cfg = KcpConfig::preset(KcpMode::Fast3);
        let mut k = Kcp::new(5, &cfg, 0);
        let cap = k.send_capacity();
        assert_eq!(cap, 2 * 128 * 1306);
        let big = vec![7u8; cap + 1000];
        assert_eq!(k.send(&big), cap);
        assert_eq!(k.send_capacity(), 0);
        assert_eq!(k.send(&big), 0);
        assert_eq!(k.wait_snd(), 256);
        let mut n = 0;
        k.update(0, &mut |_d: &mut [u8]| n += 1);
        // initial remote window is 32 segments: 32 datagrams of one full segment each
        assert_eq!(n, 32);
        assert_eq!(k.wait_snd(), 256);
        assert!(
            diff(k.next_deadline(0), 0) > 0,
            "nothing urgent after a flush"
        );
    }

    #[test]
    fn next_deadline_is_now_when_data_fits() {
        let cfg = KcpConfig::preset(KcpMode::Fast);
        let mut k = Kcp::new(5, &cfg, 0);
        k.update(100, &mut |_d: &mut [u8]| {});
        assert_eq!(k.next_deadline(101), 130);
        k.send(b"hello");
        assert_eq!(k.next_deadline(101), 101);
        let mut sent = 0;
        k.update(101, &mut |_d: &mut [u8]| sent += 1);
        assert_eq!(sent, 1);
        assert_eq!(k.next_deadline(101), 130);
    }

    fn snapshot(k: &Kcp) -> (usize, usize, u32, u32, u32, KcpStats) {
        let mut s = k.stats().clone();
        s.in_errors = 0;
        (
            k.readable(),
            k.wait_snd(),
            k.rto(),
            k.srtt(),
            k.remote_window(),
            s,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn arbitrary_input_never_panics_nor_corrupts(
            junk in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 1..6),
            our_conv in proptest::bool::ANY,
        ) {
            let cfg = KcpConfig::preset(KcpMode::Fast3);
            let mut sim = Sim::new(&cfg, 11, 0.02);
            sim.run(40_000, 40_000, None);
            let mut all_rejected = true;
            for j in &junk {
                fuzz_input(j);
                let mut j = j.clone();
                if our_conv && j.len() >= 4 {
                    j[..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
                }
                let now = sim.now();
                let before = snapshot(&sim.b.kcp);
                match sim.b.kcp.input(now, &j) {
                    Err(_) => proptest::prop_assert_eq!(before, snapshot(&sim.b.kcp)),
                    Ok(()) => all_rejected = false,
                }
            }
            if all_rejected {
                sim.run(200_000, 100_000, None);
            }
        }
    }
}
