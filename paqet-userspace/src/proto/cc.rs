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
    pub const OFF: CcConfig = CcConfig { algorithm: CcAlgorithm::Off, bandwidth: 0 };
    /// BBR.
    pub const BBR: CcConfig = CcConfig { algorithm: CcAlgorithm::Bbr, bandwidth: 0 };
    /// A fixed rate in bytes per second.
    pub fn fixed(bytes_per_sec: u64) -> Self {
        CcConfig { algorithm: CcAlgorithm::Fixed, bandwidth: bytes_per_sec }
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
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
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
    if !bytes.is_finite() || bytes < 1.0 || bytes > 1e12 {
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
