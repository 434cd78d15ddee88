//! Sender-side congestion control and pacing for KCP, as sans-IO state fed by the ARQ (`proto::kcp`).
//!
//! Nothing here changes a byte on the wire: it only decides *when* the sender transmits a segment it
//! would have sent anyway (pacing) and *how much* may be unacknowledged (congestion window), so every
//! upstream peer benefits. Three algorithms (`transport.kcp.cc`):
//!
//! - [`CcAlgorithm::Bbr`] (default): model-based, after BBR v1 (Cardwell et al., "BBR: Congestion-Based
//!   Congestion Control", ACM Queue 2016, and draft-cardwell-iccrg-bbr-congestion-control): the bottleneck
//!   bandwidth is the windowed maximum of per-ACK delivery-rate samples, the propagation delay the windowed
//!   minimum RTT; the sender paces at `gain × bandwidth` with the gain cycling 1.25 / 0.75 / 1 × 6 to probe,
//!   and bounds the data in flight at `2 × bandwidth × min_rtt`. Random loss is not congestion: only a
//!   round-trip sample (at least [`LOSS_MIN_SEGMENTS`] segments) whose loss share exceeds
//!   [`LOSS_THRESHOLD`] caps the data in flight (to 70 % of what was in flight, then probed up again as
//!   BBR v2 does with `inflight_hi`).
//! - [`CcAlgorithm::Fixed`]: paces at the configured `transport.kcp.bandwidth` whatever is lost (for users
//!   who know their link); retransmissions are paced inside that rate.
//! - [`CcAlgorithm::Off`]: upstream's exact behaviour (no pacing, the window is sent in one burst); the ARQ
//!   keeps kcp-go's retransmission rules unchanged.
//!
//! The clock is the session's millisecond clock; rates are bytes per second. Delivery-rate samples follow
//! draft-cheng-iccrg-delivery-rate-estimation: each transmitted segment remembers the connection's
//! delivered count and times when it left, and the ACK of the newest-sent segment of an ACK datagram
//! yields `delivered bytes / max(send interval, ack interval)`.
//!
//! To add an algorithm: a variant of [`CcAlgorithm`] (and its name in `FromStr`/`Display`), a type
//! implementing [`Controller`], and a line in [`new_controller`]; the ARQ, pacing, metrics and the
//! simulated-pair tests pick it up.
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Loss share of one sample above which loss is read as congestion (random loss below it is not).
pub const LOSS_THRESHOLD: f64 = 0.20;
/// Segments (delivered + lost) a loss sample needs before [`LOSS_THRESHOLD`] is applied to it.
pub const LOSS_MIN_SEGMENTS: u64 = 64;

/// Which congestion controller a session runs (`transport.kcp.cc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CcAlgorithm {
    /// Model-based (bandwidth and min-RTT estimation, pacing-gain cycling).
    #[default]
    Bbr,
    /// A fixed pacing rate (`transport.kcp.bandwidth`).
    Fixed,
    /// Upstream's behaviour: no pacing, window-limited bursts.
    Off,
}

/// An unknown `transport.kcp.cc` string.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown congestion control `{0}` (expected bbr, fixed or off)")]
pub struct CcParseError(pub String);

impl FromStr for CcAlgorithm {
    type Err = CcParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bbr" => Ok(CcAlgorithm::Bbr),
            "fixed" => Ok(CcAlgorithm::Fixed),
            "off" => Ok(CcAlgorithm::Off),
            other => Err(CcParseError(other.to_string())),
        }
    }
}

impl fmt::Display for CcAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CcAlgorithm::Bbr => "bbr",
            CcAlgorithm::Fixed => "fixed",
            CcAlgorithm::Off => "off",
        })
    }
}

/// Congestion-control settings of a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CcConfig {
    pub algorithm: CcAlgorithm,
    /// Pacing rate of [`CcAlgorithm::Fixed`] in bytes per second (ignored by the others).
    pub bandwidth: u64,
}

impl CcConfig {
    /// Upstream's behaviour.
    pub const OFF: CcConfig = CcConfig {
        algorithm: CcAlgorithm::Off,
        bandwidth: 0,
    };
    /// BBR.
    pub const BBR: CcConfig = CcConfig {
        algorithm: CcAlgorithm::Bbr,
        bandwidth: 0,
    };
    /// A fixed rate in bytes per second.
    pub fn fixed(bytes_per_sec: u64) -> Self {
        CcConfig {
            algorithm: CcAlgorithm::Fixed,
            bandwidth: bytes_per_sec,
        }
    }
}

/// A `transport.kcp.bandwidth` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("bandwidth `{0}`: expected a number with a unit: bit/s (kbit, mbit, gbit) or bytes/s (kb, mb, gb; 1000-based), e.g. \"100mbit\" or \"12.5mb\"")]
pub struct BandwidthParseError(pub String);

/// Parses a bandwidth such as `100mbit`, `1.5gbit`, `800kbit`, `12.5mb`, `500kb` or a bare number of
/// bytes per second; returns bytes per second. Units are decimal (1 mbit = 10^6 bit/s) and case-insensitive;
/// `bps`/`mbps`… mean bits, `b`/`mb`/`mib`… bytes.
pub fn parse_bandwidth(s: &str) -> Result<u64, BandwidthParseError> {
    let err = || BandwidthParseError(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| err())?;
    let (mult, bits) = match unit.trim() {
        "" | "b" => (1.0, false),
        "bps" | "bit" => (1.0, true),
        "kbit" | "kbps" => (1e3, true),
        "mbit" | "mbps" => (1e6, true),
        "gbit" | "gbps" => (1e9, true),
        "kb" | "k" => (1e3, false),
        "mb" | "m" => (1e6, false),
        "gb" | "g" => (1e9, false),
        "kib" => (1024.0, false),
        "mib" => (1024.0 * 1024.0, false),
        "gib" => (1024.0 * 1024.0 * 1024.0, false),
        _ => return Err(err()),
    };
    let bytes = v * mult / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || !(1.0..=1e12).contains(&bytes) {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

/// What a session's congestion controller and ARQ currently estimate (for `/metrics` and `dump`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CcStats {
    pub algorithm: CcAlgorithm,
    /// BBR state name (`startup`, `drain`, `probe_bw`, `probe_rtt`), or `fixed` / `off`.
    pub state: &'static str,
    /// Current pacing rate, bytes/s (0 = not paced).
    pub pacing_rate: u64,
    /// Estimated bottleneck bandwidth, bytes/s (BBR; the configured rate for fixed; 0 for off).
    pub btl_bw: u64,
    /// Latest delivery-rate sample, bytes/s.
    pub delivery_rate: u64,
    /// Minimum RTT seen in the filter window, ms (0 = none yet).
    pub min_rtt_ms: u32,
    /// Smoothed RTT, ms.
    pub srtt_ms: u32,
    /// RTT variation, ms.
    pub rttvar_ms: u32,
    /// Current retransmission timeout, ms.
    pub rto_ms: u32,
    /// Congestion window, bytes (u64::MAX = none).
    pub cwnd_bytes: u64,
    /// Unacknowledged bytes in flight.
    pub inflight_bytes: u64,
    /// Our send window, segments.
    pub sndwnd: u32,
    /// Our receive window, segments.
    pub rcvwnd: u32,
    /// The peer's last advertised free receive window, segments.
    pub rmt_wnd: u32,
    /// Bandwidth-delay product of the path, segments (0 = not known yet).
    pub bdp_segments: u32,
    /// PUSH payload bytes sent, retransmissions included.
    pub bytes_sent: u64,
    /// PUSH payload bytes acknowledged (delivered).
    pub bytes_delivered: u64,
    /// Segments declared lost (RTO or fast retransmit) / segments sent.
    pub loss_ratio: f64,
    /// Retransmitted segments / segments sent.
    pub retrans_ratio: f64,
    /// Retransmissions found spurious afterwards (the original transmission's ACK arrived).
    pub spurious_retrans: u64,
    /// Which window keeps the sender below the path's BDP, if any: `sndwnd` or `peer_rcvwnd`.
    pub window_limited_by: Option<&'static str>,
}

/// One delivery-rate sample, taken when an ACK datagram acknowledges data (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateSample {
    /// Bytes the connection had delivered in total after this ACK (`C.delivered`).
    pub delivered: u64,
    /// `C.delivered` when the newest acknowledged segment was sent (`P.delivered`).
    pub prior_delivered: u64,
    /// Bytes delivered over the sample's interval.
    pub delivered_in_interval: u64,
    /// The sample's interval in ms (`max(send interval, ack interval)`, at least 1).
    pub interval_ms: u64,
    /// Bytes newly acknowledged by this ACK datagram.
    pub acked: u64,
    /// RTT measured by this ACK datagram (ms, from the echoed timestamp), if any.
    pub rtt_ms: Option<u32>,
    /// The newest acknowledged segment was sent while the sender had nothing more to send.
    pub app_limited: bool,
    /// Bytes in flight before this ACK was processed.
    pub prior_inflight: u64,
    /// Bytes in flight after it.
    pub inflight: u64,
}

impl RateSample {
    /// Delivery rate of the sample in bytes per second.
    pub fn rate(&self) -> u64 {
        self.delivered_in_interval.saturating_mul(1000) / self.interval_ms.max(1)
    }
}

/// A congestion controller: fed ACK samples and losses on the session clock (ms), it sets the pacing rate
/// and the congestion window the ARQ honours.
pub trait Controller: Send {
    /// An ACK datagram acknowledged data.
    fn on_ack(&mut self, now: u64, rs: &RateSample);
    /// `bytes` of data were declared lost (RTO or fast retransmit) with `inflight` bytes in flight.
    fn on_loss(&mut self, now: u64, bytes: u64, inflight: u64);
    /// `bytes` declared lost earlier turned out to be delivered (the retransmission was spurious).
    fn on_spurious(&mut self, _bytes: u64) {}
    /// Pacing rate in payload bytes per second.
    fn pacing_rate(&self) -> u64;
    /// Congestion window in payload bytes.
    fn cwnd(&self) -> u64;
    /// Estimated bottleneck bandwidth (bytes/s) and min RTT (ms, 0 = unknown) for the BDP and stats.
    fn model(&self) -> (u64, u32);
    /// State name for stats.
    fn state(&self) -> &'static str;
}

/// The controller of `cfg` (`None` for [`CcAlgorithm::Off`]). `mss` is the segment payload, `wire_per_seg`
/// the bytes one full segment occupies on the wire (fixed rates are wire rates).
pub fn new_controller(
    cfg: &CcConfig,
    mss: usize,
    wire_per_seg: usize,
) -> Option<Box<dyn Controller>> {
    match cfg.algorithm {
        CcAlgorithm::Off => None,
        CcAlgorithm::Bbr => Some(Box::new(Bbr::new(mss as u64))),
        CcAlgorithm::Fixed => Some(Box::new(Fixed::new(
            cfg.bandwidth,
            mss as u64,
            wire_per_seg as u64,
        ))),
    }
}

/// Token-bucket pacer on the millisecond clock: tokens (payload bytes) accrue at the pacing rate up to a
/// burst of [`PACE_BURST_MS`] of the rate (at least [`PACE_BURST_SEGMENTS`] segments); a segment may leave
/// while the balance is not negative. The burst covers the worker's timer granularity (1 ms, woken late by
/// up to a tick), so the configured rate is reached without sending a window at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pacer {
    tokens: f64,
    last: u64,
    started: bool,
}

/// Longest burst the pacer allows, in ms of the pacing rate.
pub const PACE_BURST_MS: f64 = 4.0;
/// Smallest burst the pacer allows, in segments.
pub const PACE_BURST_SEGMENTS: f64 = 8.0;

impl Pacer {
    fn burst(rate: u64, mss: usize) -> f64 {
        (rate as f64 * PACE_BURST_MS / 1000.0).max(PACE_BURST_SEGMENTS * mss as f64)
    }

    /// Tokens at `now` without changing state.
    pub fn tokens_at(&self, now: u64, rate: u64, mss: usize) -> f64 {
        if !self.started {
            return Self::burst(rate, mss);
        }
        let dt = now.saturating_sub(self.last) as f64;
        (self.tokens + rate as f64 * dt / 1000.0).min(Self::burst(rate, mss))
    }

    /// Brings the balance up to `now`.
    pub fn refill(&mut self, now: u64, rate: u64, mss: usize) {
        self.tokens = self.tokens_at(now, rate, mss);
        self.last = now;
        self.started = true;
    }

    /// True when a segment may leave now (after [`Pacer::refill`]).
    pub fn ready(&self) -> bool {
        self.tokens >= 0.0
    }

    /// Charges a sent segment.
    pub fn spend(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }

    /// The earliest clock value at which a segment may leave (≥ `now`).
    pub fn release_at(&self, now: u64, rate: u64, mss: usize) -> u64 {
        let t = self.tokens_at(now, rate, mss);
        if t >= 0.0 || rate == 0 {
            return now;
        }
        now + ((-t) * 1000.0 / rate as f64).ceil().max(1.0) as u64
    }
}

/// Windowed maximum over the last `window` rounds (Kathleen Nichols' three-sample filter, as BBR uses).
#[derive(Clone, Copy, Debug, Default)]
struct MaxFilter {
    s: [(u64, u64); 3], // (round, value)
}

impl MaxFilter {
    fn get(&self) -> u64 {
        self.s[0].1
    }
    fn reset(&mut self, round: u64, v: u64) {
        self.s = [(round, v); 3];
    }
    fn update(&mut self, round: u64, v: u64, window: u64) {
        if v >= self.s[0].1 || round.saturating_sub(self.s[2].0) > window {
            self.reset(round, v);
            return;
        }
        if v >= self.s[1].1 {
            self.s[2] = (round, v);
            self.s[1] = (round, v);
        } else if v >= self.s[2].1 {
            self.s[2] = (round, v);
        }
        // expire old best samples
        if round.saturating_sub(self.s[0].0) > window {
            self.s[0] = self.s[1];
            self.s[1] = self.s[2];
            self.s[2] = (round, v);
            if round.saturating_sub(self.s[0].0) > window {
                self.s[0] = self.s[1];
                self.s[1] = self.s[2];
            }
        } else if self.s[1].0 == self.s[0].0 && round.saturating_sub(self.s[1].0) > window / 4 {
            self.s[1] = (round, v);
            self.s[2] = (round, v);
        } else if self.s[2].0 == self.s[1].0 && round.saturating_sub(self.s[2].0) > window / 2 {
            self.s[2] = (round, v);
        }
    }
}

const BBR_HIGH_GAIN: f64 = 2.885; // 2/ln(2)
const BBR_CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Rounds the bandwidth filter remembers.
const BBR_BW_WINDOW: u64 = 10;
/// How long a min-RTT sample stays valid before PROBE_RTT (ms).
const BBR_MIN_RTT_WINDOW: u64 = 10_000;
const BBR_PROBE_RTT_MS: u64 = 200;
const BBR_MIN_CWND_SEGS: u64 = 4;
/// Initial congestion window in segments (kcp-go's initial remote window is 32 segments too).
const BBR_INIT_CWND_SEGS: u64 = 32;
/// Factor applied to the data in flight when a sample's loss exceeds [`LOSS_THRESHOLD`].
const BBR_LOSS_BETA: f64 = 0.7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BbrMode {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

/// BBR (see the module doc).
pub struct Bbr {
    mss: u64,
    mode: BbrMode,
    bw: MaxFilter,
    min_rtt: u32,
    min_rtt_stamp: u64,
    have_rtt: bool,
    probe_rtt_done: Option<u64>,
    probe_rtt_round_done: bool,
    round: u64,
    next_round_delivered: u64,
    full_bw: u64,
    full_bw_count: u32,
    filled_pipe: bool,
    pacing_gain: f64,
    cwnd_gain: f64,
    cycle_idx: usize,
    cycle_stamp: u64,
    cwnd: u64,
    prior_cwnd: u64,
    pacing_rate: u64,
    delivered: u64,
    /// Loss accounting since the last evaluated sample: bytes lost / delivered.
    lost_bytes: u64,
    sample_delivered: u64,
    /// Cap on the data in flight after a round with excess loss (BBR v2's `inflight_hi`).
    inflight_hi: Option<u64>,
    /// Largest in-flight seen since the last loss evaluation (what the losses were sent under).
    peak_inflight: u64,
    /// Smallest RTT sample of the current round (start-up's queue-growth exit).
    round_min_rtt: Option<u32>,
}

impl Bbr {
    pub fn new(mss: u64) -> Self {
        let cwnd = BBR_INIT_CWND_SEGS * mss;
        Bbr {
            mss,
            mode: BbrMode::Startup,
            bw: MaxFilter::default(),
            min_rtt: 0,
            min_rtt_stamp: 0,
            have_rtt: false,
            probe_rtt_done: None,
            probe_rtt_round_done: false,
            round: 0,
            next_round_delivered: 0,
            full_bw: 0,
            full_bw_count: 0,
            filled_pipe: false,
            pacing_gain: BBR_HIGH_GAIN,
            cwnd_gain: BBR_HIGH_GAIN,
            cycle_idx: 0,
            cycle_stamp: 0,
            cwnd,
            prior_cwnd: cwnd,
            // Before any sample: the initial window over a 1 ms RTT guess, at startup gain.
            pacing_rate: (BBR_HIGH_GAIN * cwnd as f64 * 1000.0) as u64,
            delivered: 0,
            lost_bytes: 0,
            sample_delivered: 0,
            inflight_hi: None,
            peak_inflight: 0,
            round_min_rtt: None,
        }
    }

    fn btl_bw(&self) -> u64 {
        self.bw.get()
    }

    /// BDP in bytes at `gain` (the min RTT is at least 1 ms: the clock's resolution).
    fn bdp(&self, gain: f64) -> u64 {
        if !self.have_rtt || self.btl_bw() == 0 {
            return BBR_INIT_CWND_SEGS * self.mss;
        }
        let rtt = self.min_rtt.max(1) as f64;
        (gain * self.btl_bw() as f64 * rtt / 1000.0) as u64
    }

    fn target_cwnd(&self, gain: f64) -> u64 {
        self.bdp(gain) + 3 * self.mss
    }

    /// The window while PROBE_RTT drains the queue: half a BDP (BBR v2), at least four segments.
    fn probe_rtt_cwnd(&self) -> u64 {
        self.bdp(0.5).max(BBR_MIN_CWND_SEGS * self.mss)
    }

    fn set_pacing(&mut self, gain: f64) {
        let bw = self.btl_bw();
        if bw == 0 {
            return;
        }
        let rate = (gain * bw as f64) as u64;
        if self.filled_pipe || rate > self.pacing_rate {
            self.pacing_rate = rate.max(self.mss);
        }
    }

    fn advance_cycle(&mut self, now: u64, rs: &RateSample) {
        let elapsed = now.saturating_sub(self.cycle_stamp) > self.min_rtt.max(1) as u64;
        let gain = self.pacing_gain;
        let next = if gain > 1.0 {
            elapsed && rs.prior_inflight >= self.bdp(gain)
        } else if gain < 1.0 {
            elapsed || rs.prior_inflight <= self.bdp(1.0)
        } else {
            elapsed
        };
        if next {
            self.cycle_idx = (self.cycle_idx + 1) % BBR_CYCLE.len();
            self.cycle_stamp = now;
            self.pacing_gain = BBR_CYCLE[self.cycle_idx];
        }
    }

    fn enter_probe_bw(&mut self, now: u64) {
        self.mode = BbrMode::ProbeBw;
        self.cwnd_gain = 2.0;
        // Start anywhere but the draining phase; deterministic (the round number spreads sessions).
        self.cycle_idx = (self.round as usize % (BBR_CYCLE.len() - 1) + 2) % BBR_CYCLE.len();
        self.pacing_gain = BBR_CYCLE[self.cycle_idx];
        self.cycle_stamp = now;
    }

    fn check_loss(&mut self, round_start: bool, inflight: u64) {
        let total = self.lost_bytes + self.sample_delivered;
        if !round_start || total < LOSS_MIN_SEGMENTS * self.mss {
            return;
        }
        let share = self.lost_bytes as f64 / total as f64;
        if share > LOSS_THRESHOLD {
            // Cap at 70 % of what was in flight while the losses were sent, never below one BDP of the
            // model (the pipe itself): after a burst of losses the flight collapses, and a cap taken
            // from that would starve the path for many round trips.
            let peak = inflight.max(self.peak_inflight);
            let cap = ((peak as f64) * BBR_LOSS_BETA) as u64;
            self.inflight_hi = Some(cap.max(self.bdp(1.0)).max(BBR_MIN_CWND_SEGS * self.mss));
            if self.mode == BbrMode::Startup {
                self.filled_pipe = true;
            }
        } else if let Some(hi) = self.inflight_hi {
            // No excess loss over this sample: probe the cap up again (× 1.5 per sample, so a cap set by a
            // start-up overshoot is gone within a few round trips), and drop it once it is far above need.
            let hi = hi + hi / 2;
            self.inflight_hi = (hi < 4 * self.bdp(1.0)).then_some(hi);
        }
        self.lost_bytes = 0;
        self.sample_delivered = 0;
        self.peak_inflight = 0;
    }

    /// Start-up ends when a queue persists through a whole round: the round's smallest RTT exceeds the
    /// min RTT by an eighth of it (4..=16 ms, HyStart's delay threshold). A shallow bottleneck buffer is
    /// full long before the bandwidth stops growing by 25 % per round, and start-up's 2.89× pacing would
    /// then overflow it by a large factor.
    fn check_startup_queue(&mut self, round_start: bool) {
        if !round_start {
            return;
        }
        if let Some(r) = self.round_min_rtt.take() {
            let thresh = (self.min_rtt / 8).clamp(4, 16);
            if self.mode == BbrMode::Startup && self.have_rtt && r > self.min_rtt + thresh {
                self.filled_pipe = true;
            }
        }
    }
}

impl Controller for Bbr {
    fn on_ack(&mut self, now: u64, rs: &RateSample) {
        self.delivered = rs.delivered;
        self.sample_delivered += rs.acked;
        self.peak_inflight = self.peak_inflight.max(rs.prior_inflight);
        // round counting
        let round_start = rs.prior_delivered >= self.next_round_delivered;
        if round_start {
            self.next_round_delivered = rs.delivered;
            self.round += 1;
        }
        // bandwidth
        let rate = rs.rate();
        if rate > 0 && (!rs.app_limited || rate >= self.btl_bw()) {
            self.bw.update(self.round, rate, BBR_BW_WINDOW);
        }
        // full pipe
        if round_start && !self.filled_pipe && !rs.app_limited {
            let bw = self.btl_bw();
            if bw as f64 >= self.full_bw as f64 * 1.25 {
                self.full_bw = bw;
                self.full_bw_count = 0;
            } else {
                self.full_bw_count += 1;
                if self.full_bw_count >= 3 {
                    self.filled_pipe = true;
                }
            }
        }
        self.check_loss(round_start, rs.inflight);
        self.check_startup_queue(round_start);
        if let Some(r) = rs.rtt_ms {
            self.round_min_rtt = Some(self.round_min_rtt.map_or(r, |m| m.min(r)));
        }
        // drain
        if self.mode == BbrMode::Startup && self.filled_pipe {
            self.mode = BbrMode::Drain;
            self.pacing_gain = 1.0 / BBR_HIGH_GAIN;
            self.cwnd_gain = BBR_HIGH_GAIN;
        }
        if self.mode == BbrMode::Drain && rs.inflight <= self.bdp(1.0) {
            self.enter_probe_bw(now);
        }
        if self.mode == BbrMode::ProbeBw {
            self.advance_cycle(now, rs);
        }
        // min RTT and PROBE_RTT
        let expired = self.have_rtt && now > self.min_rtt_stamp + BBR_MIN_RTT_WINDOW;
        if let Some(rtt) = rs.rtt_ms {
            if !self.have_rtt {
                // First RTT: the initial pacing rate was a guess (1 ms); now it is the window over the RTT.
                self.pacing_rate =
                    (BBR_HIGH_GAIN * self.cwnd as f64 * 1000.0 / rtt.max(1) as f64) as u64;
            }
            if !self.have_rtt || rtt <= self.min_rtt || expired {
                self.min_rtt = rtt;
                self.min_rtt_stamp = now;
                self.have_rtt = true;
            }
        }
        if expired && self.mode != BbrMode::ProbeRtt {
            self.mode = BbrMode::ProbeRtt;
            self.pacing_gain = 1.0;
            self.prior_cwnd = self.cwnd;
            self.probe_rtt_done = None;
        }
        if self.mode == BbrMode::ProbeRtt {
            match self.probe_rtt_done {
                None if rs.inflight <= self.probe_rtt_cwnd() => {
                    self.probe_rtt_done = Some(now + BBR_PROBE_RTT_MS);
                    self.probe_rtt_round_done = false;
                    self.next_round_delivered = rs.delivered;
                }
                Some(done) => {
                    if round_start {
                        self.probe_rtt_round_done = true;
                    }
                    if self.probe_rtt_round_done && now >= done {
                        self.min_rtt_stamp = now;
                        self.cwnd = self.cwnd.max(self.prior_cwnd);
                        if self.filled_pipe {
                            self.enter_probe_bw(now);
                        } else {
                            self.mode = BbrMode::Startup;
                            self.pacing_gain = BBR_HIGH_GAIN;
                            self.cwnd_gain = BBR_HIGH_GAIN;
                        }
                    }
                }
                None => {}
            }
        }
        // pacing rate and cwnd
        self.set_pacing(self.pacing_gain);
        let target = self.target_cwnd(self.cwnd_gain);
        if self.filled_pipe {
            self.cwnd = (self.cwnd + rs.acked).min(target);
        } else if self.cwnd < target || self.delivered < BBR_INIT_CWND_SEGS * self.mss {
            self.cwnd += rs.acked;
        }
        self.cwnd = self.cwnd.max(BBR_MIN_CWND_SEGS * self.mss);
    }

    fn on_loss(&mut self, _now: u64, bytes: u64, _inflight: u64) {
        self.lost_bytes += bytes;
    }

    fn on_spurious(&mut self, bytes: u64) {
        self.lost_bytes = self.lost_bytes.saturating_sub(bytes);
    }

    fn pacing_rate(&self) -> u64 {
        self.pacing_rate
    }

    fn cwnd(&self) -> u64 {
        let mut c = self.cwnd;
        if self.mode == BbrMode::ProbeRtt {
            c = c.min(self.probe_rtt_cwnd());
        }
        if let Some(hi) = self.inflight_hi {
            c = c.min(hi);
        }
        c
    }

    fn model(&self) -> (u64, u32) {
        (
            self.btl_bw(),
            if self.have_rtt {
                self.min_rtt.max(1)
            } else {
                0
            },
        )
    }

    fn state(&self) -> &'static str {
        match self.mode {
            BbrMode::Startup => "startup",
            BbrMode::Drain => "drain",
            BbrMode::ProbeBw => "probe_bw",
            BbrMode::ProbeRtt => "probe_rtt",
        }
    }
}

/// A fixed pacing rate (`transport.kcp.bandwidth`, a wire rate), losses or not. The window is twice the
/// rate times the smallest RTT seen (plus a few segments), so a path slower than configured holds at most
/// one BDP of queue.
pub struct Fixed {
    /// Payload bytes per second (the wire rate less the per-segment framing).
    rate: u64,
    mss: u64,
    min_rtt: Option<u32>,
}

impl Fixed {
    pub fn new(wire_bytes_per_sec: u64, mss: u64, wire_per_seg: u64) -> Self {
        let rate = (wire_bytes_per_sec as u128 * mss as u128 / wire_per_seg.max(1) as u128) as u64;
        Fixed {
            rate: rate.max(mss),
            mss,
            min_rtt: None,
        }
    }
}

impl Controller for Fixed {
    fn on_ack(&mut self, _now: u64, rs: &RateSample) {
        if let Some(r) = rs.rtt_ms {
            self.min_rtt = Some(self.min_rtt.map_or(r, |m| m.min(r)));
        }
    }
    fn on_loss(&mut self, _now: u64, _bytes: u64, _inflight: u64) {}
    fn pacing_rate(&self) -> u64 {
        self.rate
    }
    fn cwnd(&self) -> u64 {
        match self.min_rtt {
            Some(r) => 2 * self.rate * r.max(1) as u64 / 1000 + 4 * self.mss,
            None => u64::MAX,
        }
    }
    fn model(&self) -> (u64, u32) {
        (self.rate, self.min_rtt.map_or(0, |r| r.max(1)))
    }
    fn state(&self) -> &'static str {
        "fixed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("100mbit"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("1.5Gbit"), Ok(187_500_000));
        assert_eq!(parse_bandwidth("800kbps"), Ok(100_000));
        assert_eq!(parse_bandwidth("12.5mb"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("2mib"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_bandwidth("5000"), Ok(5000));
        for bad in ["", "fast", "10 parsecs", "-1mbit", "0", "1e99gbit"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad:?}");
        }
        assert_eq!("fixed".parse::<CcAlgorithm>(), Ok(CcAlgorithm::Fixed));
        assert!("cubic".parse::<CcAlgorithm>().is_err());
    }

    #[test]
    fn pacer_releases_at_the_rate_with_a_bounded_burst() {
        let (rate, mss) = (1_000_000u64, 1000usize); // 1000 bytes per ms
        let mut p = Pacer::default();
        p.refill(0, rate, mss);
        // Initial burst: max(4 ms of rate, 8 segments) = 8000 bytes; a segment leaves while the balance is
        // not negative, so 9.
        let mut sent = 0;
        while p.ready() {
            p.spend(mss);
            sent += 1;
        }
        assert_eq!(sent, 9);
        assert_eq!(p.release_at(0, rate, mss), 1);
        // Over 100 ms it sends 100 ms of the rate (plus the burst it started with), never more.
        let mut total = 0;
        for t in 1..=100 {
            p.refill(t, rate, mss);
            while p.ready() {
                p.spend(mss);
                total += 1;
            }
        }
        assert!((99..=101).contains(&total), "{total}");
        // Idle for a second: the burst stays bounded.
        p.refill(1100, rate, mss);
        let mut burst = 0;
        while p.ready() {
            p.spend(mss);
            burst += 1;
        }
        assert_eq!(burst, 9);
    }

    fn sample(delivered: u64, prior: u64, interval_ms: u64, rtt: u32, inflight: u64) -> RateSample {
        RateSample {
            delivered,
            prior_delivered: prior,
            delivered_in_interval: delivered - prior,
            interval_ms,
            acked: delivered - prior,
            rtt_ms: Some(rtt),
            app_limited: false,
            prior_inflight: inflight,
            inflight,
        }
    }

    #[test]
    fn bbr_learns_the_bottleneck_and_leaves_startup() {
        let mss = 1000;
        let mut b = Bbr::new(mss);
        let (rate, rtt) = (10_000_000u64, 50u32); // 10 MB/s, 50 ms: BDP 500 kB
        let mut delivered = 0u64;
        let mut now = 0u64;
        for _ in 0..40 {
            // one round: delivered grows by rate × rtt
            let prior = delivered;
            delivered += rate * rtt as u64 / 1000;
            now += rtt as u64;
            b.on_ack(now, &sample(delivered, prior, rtt as u64, rtt, 400_000));
        }
        assert_eq!(b.model(), (rate, rtt));
        assert_eq!(b.state(), "probe_bw");
        let bdp = rate * rtt as u64 / 1000;
        assert!(
            b.cwnd() >= 2 * bdp && b.cwnd() <= 2 * bdp + 4 * mss,
            "cwnd {}",
            b.cwnd()
        );
        assert!(b.pacing_rate() >= rate * 3 / 4 && b.pacing_rate() <= rate * 5 / 4);
        // Random loss below the threshold changes nothing; a round losing more than 20 % caps in-flight.
        b.on_loss(now, 10 * mss, 600_000);
        let prior = delivered;
        delivered += bdp;
        now += rtt as u64;
        b.on_ack(now, &sample(delivered, prior, rtt as u64, rtt, 600_000));
        assert!(b.inflight_hi.is_none());
        b.on_loss(now, bdp, 600_000);
        let prior = delivered;
        delivered += bdp;
        now += rtt as u64;
        b.on_ack(now, &sample(delivered, prior, rtt as u64, rtt, 600_000));
        assert!(
            b.inflight_hi.is_some() && b.cwnd() < 2 * bdp,
            "{:?} {}",
            b.inflight_hi,
            b.cwnd()
        );
        // Never below one BDP of the model.
        assert!(b.cwnd() >= bdp);
    }

    #[test]
    fn fixed_paces_the_wire_rate_and_ignores_loss() {
        let mut f = Fixed::new(12_500_000, 1306, 1416);
        assert_eq!(f.pacing_rate(), 12_500_000 * 1306 / 1416);
        assert_eq!(f.cwnd(), u64::MAX);
        f.on_loss(0, 1_000_000, 0);
        f.on_ack(10, &sample(10_000, 0, 10, 40, 0));
        assert_eq!(f.pacing_rate(), 12_500_000 * 1306 / 1416);
        assert_eq!(f.cwnd(), 2 * f.pacing_rate() * 40 / 1000 + 4 * 1306);
    }
}
