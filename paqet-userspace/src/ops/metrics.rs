//! The Prometheus metrics registry and the [`Snapshot`] the daemon fills for it.
//!
//! Workers own plain `u64` counters (no atomics on the per-packet path). The exporter asks the daemon for a
//! [`Snapshot`] when it is scraped (a callback, see [`super::OpsState`]), and [`Metrics::encode`] copies the
//! snapshot into `prometheus-client` metric families and renders them as OpenMetrics text (which Prometheus
//! scrapes like text format 0.0.4). Every exported sample name is listed in [`METRIC_NAMES`].
//!
//! Congestion-control figures (`paqet_cc_*`) have bounded cardinality: aggregates over all live sessions,
//! plus the [`CC_TOP_N`] sessions with the highest delivery rate labelled by `rank` and `peer` (series of
//! a session that leaves the top list or goes away are removed at the next scrape).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use paqet_common::XdpCounter;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::io::IoStats;
use crate::proto::cc::{CcAlgorithm, CcStats};
use crate::proto::limits::{LimitCounts, LimitKey};
use crate::worker::core::DaemonStats;

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What this binary was built from; `paqet-dp version` prints it and `paqet_build_info` carries it as
/// labels. The git fields come from `build.rs` (`unknown` for a build outside a git checkout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// The crate version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// The git commit (12 hex digits) or `unknown`.
    pub commit: &'static str,
    /// `true` when the work tree had uncommitted changes, `false`, or `unknown`.
    pub dirty: &'static str,
    /// The upstream paqet wire protocol version this build speaks.
    pub wire: &'static str,
    /// Whether the XDP program is embedded (else only the pcap data path is available).
    pub xdp: bool,
}

impl BuildInfo {
    /// The enabled data paths, comma-separated: `xdp,pcap` or `pcap`.
    pub fn features(&self) -> &'static str {
        if self.xdp {
            "xdp,pcap"
        } else {
            "pcap"
        }
    }
}

/// This build.
pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: match option_env!("PAQET_GIT_COMMIT") {
        Some(c) => c,
        None => "unknown",
    },
    dirty: match option_env!("PAQET_GIT_DIRTY") {
        Some(d) => d,
        None => "unknown",
    },
    wire: "v1.0.0-alpha.21",
    xdp: crate::io::steer::has_xdp_program(),
};

/// Every sample name [`Metrics::encode`] emits (counters with their `_total` suffix).
pub const METRIC_NAMES: &[&str] = &[
    "paqet_build_info",
    "paqet_datapath_mode",
    "paqet_sessions",
    "paqet_streams",
    "paqet_session_opens_total",
    "paqet_session_closes_total",
    "paqet_session_replacements_total",
    "paqet_stream_opens_total",
    "paqet_bytes_total",
    "paqet_packets_total",
    "paqet_tx_failures_total",
    "paqet_kcp_retransmissions_total",
    "paqet_kcp_srtt_seconds",
    "paqet_crypto_failures_total",
    "paqet_envelope_errors_total",
    "paqet_session_errors_total",
    "paqet_guard_drops_total",
    "paqet_limit_rejections_total",
    "paqet_limit_refusals_total",
    "paqet_streams_refused_total",
    "paqet_socks5_udp_channels",
    "paqet_reverse_connections_total",
    "paqet_reverse_refusals_total",
    "paqet_pcap_kernel_drops_total",
    "paqet_worker_packets_total",
    "paqet_worker_sessions",
    "paqet_server_up",
    "paqet_server_sessions",
    "paqet_server_dial_failures_total",
    "paqet_worker_handoffs_total",
    "paqet_xdp_packets_total",
    "paqet_afxdp_socket_events_total",
    "paqet_cc_sessions",
    "paqet_cc_pacing_rate_bytes_per_second",
    "paqet_cc_delivery_rate_bytes_per_second",
    "paqet_cc_srtt_seconds",
    "paqet_cc_min_rtt_seconds",
    "paqet_cc_sent_bytes_total",
    "paqet_cc_delivered_bytes_total",
    "paqet_cc_spurious_retransmissions_total",
    "paqet_cc_window_limited_sessions",
    "paqet_cc_window_limited_total",
    "paqet_cc_top_pacing_rate_bytes_per_second",
    "paqet_cc_top_btl_bw_bytes_per_second",
    "paqet_cc_top_delivery_rate_bytes_per_second",
    "paqet_cc_top_min_rtt_seconds",
    "paqet_cc_top_srtt_seconds",
    "paqet_cc_top_loss_ratio",
    "paqet_cc_top_retrans_ratio",
    "paqet_cc_top_cwnd_bytes",
    "paqet_cc_top_inflight_bytes",
];

/// How many sessions the `paqet_cc_top_*` families list (label `rank` = 1..=CC_TOP_N, by delivery rate).
pub const CC_TOP_N: usize = 5;

/// Values of the `by` label of the window-limited families, in [`CcSnapshot::window_limited`] order:
/// our send window (`transport.kcp.sndwnd`) or the peer's advertised receive window.
pub const WINDOW_LIMITED_BY: [&str; 2] = ["sndwnd", "peer_rcvwnd"];

/// Index of a [`CcStats::window_limited_by`] value in [`WINDOW_LIMITED_BY`] (None for a value this
/// exporter does not know).
pub fn window_limited_index(by: &str) -> Option<usize> {
    WINDOW_LIMITED_BY.iter().position(|b| *b == by)
}

/// One session of a worker's congestion-control top list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CcTopSession {
    pub peer: SocketAddr,
    pub stats: CcStats,
}

/// Congestion-control figures of one worker's sessions, gathered periodically from
/// [`crate::proto::session::Session::cc_stats`] (never per packet). Build it with
/// [`CcSnapshot::add_session`] per live session, [`CcSnapshot::add_retired`] for the sessions that are
/// gone, then [`CcSnapshot::finish`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CcSnapshot {
    /// Live sessions per (algorithm, state).
    pub states: Vec<(CcAlgorithm, &'static str, u64)>,
    /// Sum of the live sessions' pacing rates, bytes/s.
    pub pacing_rate: u64,
    /// Sum of the live sessions' latest delivery rates, bytes/s.
    pub delivery_rate: u64,
    /// Smoothed RTT of each live session that has one (srtt > 0), seconds.
    pub srtt_seconds: Vec<f64>,
    /// Minimum RTT of each live session that has one (min_rtt > 0), seconds.
    pub min_rtt_seconds: Vec<f64>,
    /// KCP PUSH payload bytes sent (retransmissions included), cumulative over live and gone sessions.
    pub bytes_sent: u64,
    /// KCP PUSH payload bytes acknowledged, cumulative over live and gone sessions.
    pub bytes_delivered: u64,
    /// Retransmissions found spurious, cumulative over live and gone sessions.
    pub spurious_retrans: u64,
    /// Live sessions currently held below the path's BDP by a window, by [`WINDOW_LIMITED_BY`].
    pub window_limited: [u64; 2],
    /// Sessions that became window-limited (each counted once, by the first window seen), by
    /// [`WINDOW_LIMITED_BY`]; cumulative.
    pub window_limited_total: [u64; 2],
    /// The worker's sessions with the highest delivery rate, highest first, at most [`CC_TOP_N`] after
    /// [`CcSnapshot::finish`].
    pub top: Vec<CcTopSession>,
}

/// Order of the top lists: delivery rate, then pacing rate (both descending), then peer.
fn top_order(a: &CcTopSession, b: &CcTopSession) -> std::cmp::Ordering {
    b.stats
        .delivery_rate
        .cmp(&a.stats.delivery_rate)
        .then(b.stats.pacing_rate.cmp(&a.stats.pacing_rate))
        .then(a.peer.cmp(&b.peer))
}

fn sort_top(top: &mut Vec<CcTopSession>) {
    top.sort_by(top_order);
    top.truncate(CC_TOP_N);
}

impl CcSnapshot {
    /// Adds one live session's figures.
    pub fn add_session(&mut self, peer: SocketAddr, s: &CcStats) {
        match self
            .states
            .iter_mut()
            .find(|(a, st, _)| *a == s.algorithm && *st == s.state)
        {
            Some((_, _, n)) => *n += 1,
            None => self.states.push((s.algorithm, s.state, 1)),
        }
        self.pacing_rate = self.pacing_rate.saturating_add(s.pacing_rate);
        self.delivery_rate = self.delivery_rate.saturating_add(s.delivery_rate);
        if s.srtt_ms > 0 {
            self.srtt_seconds.push(f64::from(s.srtt_ms) / 1000.0);
        }
        if s.min_rtt_ms > 0 {
            self.min_rtt_seconds.push(f64::from(s.min_rtt_ms) / 1000.0);
        }
        self.add_retired(s.bytes_sent, s.bytes_delivered, s.spurious_retrans);
        if let Some(i) = s.window_limited_by.and_then(window_limited_index) {
            self.window_limited[i] += 1;
        }
        self.top.push(CcTopSession { peer, stats: *s });
        // Keep the candidate list short on workers with many sessions (amortised: sort every N pushes).
        if self.top.len() >= 2 * CC_TOP_N {
            sort_top(&mut self.top);
        }
    }

    /// Adds the cumulative counters of sessions that are gone.
    pub fn add_retired(&mut self, bytes_sent: u64, bytes_delivered: u64, spurious_retrans: u64) {
        self.bytes_sent = self.bytes_sent.saturating_add(bytes_sent);
        self.bytes_delivered = self.bytes_delivered.saturating_add(bytes_delivered);
        self.spurious_retrans = self.spurious_retrans.saturating_add(spurious_retrans);
    }

    /// Sorts and bounds the top list.
    pub fn finish(&mut self) {
        sort_top(&mut self.top);
    }
}

/// (min, median, max) of `v` (0 for all three when empty); non-finite values are ignored.
pub fn min_median_max(v: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

/// The process role (label `role` of `paqet_sessions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RoleLabel {
    #[default]
    Client,
    Server,
}

impl RoleLabel {
    /// The label value.
    pub const fn name(self) -> &'static str {
        match self {
            RoleLabel::Client => "client",
            RoleLabel::Server => "server",
        }
    }
}

/// The packet path in use (label `mode` of `paqet_datapath_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DataPathMode {
    #[default]
    Pcap,
    XdpNative,
    XdpGeneric,
}

impl DataPathMode {
    /// All modes (each gets a series, 1 for the active one).
    pub const ALL: [DataPathMode; 3] = [
        DataPathMode::Pcap,
        DataPathMode::XdpNative,
        DataPathMode::XdpGeneric,
    ];

    /// The label value.
    pub const fn name(self) -> &'static str {
        match self {
            DataPathMode::Pcap => "pcap",
            DataPathMode::XdpNative => "xdp-native",
            DataPathMode::XdpGeneric => "xdp-generic",
        }
    }
}

/// KCP retransmission counters (kcp-go's `RetransSegs` split by cause).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KcpRetrans {
    /// RTO expired (kcp-go `LostSegs`).
    pub timeout: u64,
    /// Fast retransmit (`resend` later ACKs).
    pub fast: u64,
    /// Early retransmit.
    pub early: u64,
}

/// AF_XDP socket statistics (`XDP_STATISTICS` getsockopt), summed over one worker's sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AfXdpStats {
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub fill_ring_empty: u64,
    pub tx_invalid_descs: u64,
}

/// Client: one configured server as one worker sees it (`paqet_server_*`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerSnapshot {
    /// The server's address (the `server` label).
    pub server: String,
    /// Healthy (sessions are placed on it).
    pub up: bool,
    /// The worker's `transport.conn` slots (a worker without slots does not judge health).
    pub slots: u64,
    /// The worker's slot sessions on this server.
    pub sessions: u64,
    /// Dials to it that failed (cumulative).
    pub dial_failures: u64,
}

/// One worker's counters. All counters are cumulative since the worker started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSnapshot {
    /// Client: every configured server (health, sessions, dial failures).
    pub servers: Vec<ServerSnapshot>,
    /// Live sessions.
    pub sessions: u64,
    /// Sessions that authenticated a datagram within the smux keepalive timeout (readiness; not exported
    /// as its own family).
    pub live_sessions: u64,
    /// Open streams.
    pub streams: u64,
    pub session_opens: u64,
    pub session_closes: u64,
    /// Server: sessions replaced by a new conv from the same peer.
    pub session_replacements: u64,
    pub stream_opens: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Transmissions the kernel refused.
    pub tx_errors: u64,
    /// Frames dropped because the TX path was full.
    pub tx_queue_full: u64,
    pub kcp_retrans: KcpRetrans,
    /// Decryption integrity failures (CRC32 mismatch, GCM tag).
    pub crypto_integrity: u64,
    /// Datagrams too short for the crypto framing.
    pub crypto_truncated: u64,
    /// Frames the envelope parser rejected (not Ethernet/IP/TCP, wrong port, empty payload ...).
    pub envelope_malformed: u64,
    /// Frames longer than the capture length (cut by the snap length).
    pub envelope_truncated: u64,
    /// Client: payloads from a source other than the server.
    pub envelope_foreign: u64,
    /// Payloads for which no session exists and none may be created.
    pub no_session: u64,
    /// Server: session starts refused because their conv was already used (replays).
    pub replay: u64,
    /// Other per-datagram session errors (FEC, KCP, smux).
    pub session_protocol_errors: u64,
    /// Payloads without a valid guard prefix (dropped before decryption).
    pub guard_drops: u64,
    /// New sessions refused by `max_sessions`.
    pub limit_max_sessions: u64,
    /// Streams refused by `max_streams_total` / `max_streams_per_session`.
    pub limit_max_streams: u64,
    /// Streams closed because no header came within `header_timeout`.
    pub limit_header_timeout: u64,
    /// Sessions and streams refused per limit key ([`LimitKey::index`]; `paqet_limit_refusals_total`).
    pub limit_refusals: LimitCounts,
    /// pcap `ps_drop`.
    pub pcap_ps_drop: u64,
    /// pcap `ps_ifdrop`.
    pub pcap_ps_ifdrop: u64,
    /// XDP mode: frames that landed on this worker's queue and were handed to the worker owning their
    /// session (through its mailbox).
    pub rx_cross_worker: u64,
    /// XDP mode: frames that could not be handed to their owner (its mailbox was full) and were dropped.
    pub rx_handoff_drops: u64,
    /// AF_XDP socket statistics (XDP mode only).
    pub afxdp: Option<AfXdpStats>,
    /// Smoothed RTT of each live session, in seconds (for `paqet_kcp_srtt_seconds`).
    pub srtt_seconds: Vec<f64>,
    /// Congestion-control figures of the worker's sessions (`paqet_cc_*`).
    pub cc: CcSnapshot,
    /// The noise wire's drops (`paqet_crypto_failures_total{reason="noise_…"}`).
    pub noise: crate::worker::noise::NoiseStats,
}

impl WorkerSnapshot {
    /// Fills the counters a worker keeps in [`DaemonStats`] (with the congestion-control figures its driver
    /// gathered last, [`DaemonStats::cc`]) and its I/O backends' [`IoStats`]; the gauges (`sessions`,
    /// `streams`), KCP figures and AF_XDP statistics are set by the caller.
    pub fn from_daemon(d: &DaemonStats, io: &IoStats) -> Self {
        WorkerSnapshot {
            session_opens: d.sessions_opened,
            session_closes: d.sessions_closed,
            session_replacements: d.sessions_replaced,
            stream_opens: d.streams_opened,
            rx_packets: io.rx_frames,
            rx_bytes: io.rx_bytes,
            tx_packets: io.tx_frames,
            tx_bytes: io.tx_bytes,
            tx_errors: io.tx_errors,
            tx_queue_full: io.tx_drops,
            crypto_integrity: d.rx_crypto_failures,
            envelope_malformed: d.rx_bad_envelope,
            envelope_truncated: io.rx_truncated,
            envelope_foreign: d.rx_foreign,
            no_session: d.rx_no_session,
            replay: d.rx_replay_drops,
            session_protocol_errors: d.rx_session_errors,
            guard_drops: d.rx_guard_drops,
            limit_max_sessions: d.sessions_rejected,
            limit_max_streams: d.streams_rejected,
            limit_header_timeout: d.limit_refusals[LimitKey::HeaderTimeout.index()],
            limit_refusals: d.limit_refusals,
            pcap_ps_drop: io.kernel_drops,
            pcap_ps_ifdrop: io.if_drops,
            rx_cross_worker: d.rx_cross_worker,
            rx_handoff_drops: d.rx_handoff_drops,
            cc: d.cc.clone(),
            noise: d.noise,
            ..WorkerSnapshot::default()
        }
    }
}

/// Everything [`Metrics::encode`] exports, filled by the daemon on scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub role: RoleLabel,
    pub mode: DataPathMode,
    /// One entry per worker, in worker order (the index is the `worker` label).
    pub workers: Vec<WorkerSnapshot>,
    /// XDP program counters indexed by `XdpCounter as usize` (XDP mode only).
    pub xdp: Option<[u64; XdpCounter::COUNT as usize]>,
}

type Labels = Vec<(&'static str, String)>;
type CounterFamily = Family<Labels, Counter<u64, AtomicU64>>;
type GaugeFamily = Family<Labels, Gauge<i64, AtomicI64>>;
type FloatGaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;

fn l1(k: &'static str, v: &str) -> Labels {
    vec![(k, v.to_string())]
}

fn l2(k1: &'static str, v1: &str, k2: &'static str, v2: &str) -> Labels {
    vec![(k1, v1.to_string()), (k2, v2.to_string())]
}

fn set_c(f: &CounterFamily, labels: &Labels, v: u64) {
    f.get_or_create(labels).inner().store(v, Ordering::Relaxed);
}

fn set_g(f: &GaugeFamily, labels: &Labels, v: u64) {
    f.get_or_create(labels)
        .set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// The metric families. Cheap to share (`Send + Sync`); [`Metrics::encode`] takes `&self`.
pub struct Metrics {
    registry: Registry,
    /// Serializes update + encode when several server threads share one registry.
    encoding: Mutex<()>,
    build_info: GaugeFamily,
    mode: GaugeFamily,
    sessions: GaugeFamily,
    streams: Gauge<i64, AtomicI64>,
    session_opens: Counter<u64, AtomicU64>,
    session_closes: Counter<u64, AtomicU64>,
    session_replacements: Counter<u64, AtomicU64>,
    stream_opens: Counter<u64, AtomicU64>,
    bytes: CounterFamily,
    packets: CounterFamily,
    tx_failures: CounterFamily,
    retrans: CounterFamily,
    srtt: FloatGaugeFamily,
    crypto: CounterFamily,
    envelope: CounterFamily,
    session_errors: CounterFamily,
    guard_drops: Counter<u64, AtomicU64>,
    limits: CounterFamily,
    /// Sessions and streams refused, by the configuration key of the limit.
    limit_refusals: CounterFamily,
    /// Server streams refused by policy, by reason (`target_denied`: `server.allow` / `server.deny`).
    streams_refused: CounterFamily,
    /// Client: live SOCKS5 UDP ASSOCIATE datagram channels (each holds an idle timer), process-wide.
    socks5_udp_channels: Gauge<i64, AtomicI64>,
    reverse_connections: CounterFamily,
    reverse_refusals: CounterFamily,
    pcap_drops: CounterFamily,
    worker_packets: CounterFamily,
    worker_sessions: GaugeFamily,
    server_up: GaugeFamily,
    server_sessions: GaugeFamily,
    server_dial_failures: CounterFamily,
    worker_handoffs: CounterFamily,
    xdp: CounterFamily,
    afxdp: CounterFamily,
    cc_sessions: GaugeFamily,
    cc_pacing_rate: Gauge<i64, AtomicI64>,
    cc_delivery_rate: Gauge<i64, AtomicI64>,
    cc_srtt: FloatGaugeFamily,
    cc_min_rtt: FloatGaugeFamily,
    cc_sent_bytes: Counter<u64, AtomicU64>,
    cc_delivered_bytes: Counter<u64, AtomicU64>,
    cc_spurious: Counter<u64, AtomicU64>,
    cc_window_limited: GaugeFamily,
    cc_window_limited_total: CounterFamily,
    cc_top: CcTopFamilies,
}

/// The per-session (`rank`, `peer`) families of the top list.
#[derive(Default)]
struct CcTopFamilies {
    pacing_rate: GaugeFamily,
    btl_bw: GaugeFamily,
    delivery_rate: GaugeFamily,
    min_rtt: FloatGaugeFamily,
    srtt: FloatGaugeFamily,
    loss_ratio: FloatGaugeFamily,
    retrans_ratio: FloatGaugeFamily,
    cwnd: GaugeFamily,
    inflight: GaugeFamily,
}

impl CcTopFamilies {
    fn clear(&self) {
        for f in [
            &self.pacing_rate,
            &self.btl_bw,
            &self.delivery_rate,
            &self.cwnd,
            &self.inflight,
        ] {
            f.clear();
        }
        for f in [
            &self.min_rtt,
            &self.srtt,
            &self.loss_ratio,
            &self.retrans_ratio,
        ] {
            f.clear();
        }
    }

    fn register(&self, r: &mut Registry) {
        let top =
            " of the sessions with the highest delivery rate (labels rank 1..5, peer ip:port)";
        r.register(
            "cc_top_pacing_rate_bytes_per_second",
            format!("Pacing rate, bytes/s (0 = not paced){top}"),
            self.pacing_rate.clone(),
        );
        r.register(
            "cc_top_btl_bw_bytes_per_second",
            format!("Estimated bottleneck bandwidth, bytes/s{top}"),
            self.btl_bw.clone(),
        );
        r.register(
            "cc_top_delivery_rate_bytes_per_second",
            format!("Latest delivery-rate sample, bytes/s{top}"),
            self.delivery_rate.clone(),
        );
        r.register(
            "cc_top_min_rtt_seconds",
            format!("Minimum RTT (0 = no sample yet){top}"),
            self.min_rtt.clone(),
        );
        r.register(
            "cc_top_srtt_seconds",
            format!("Smoothed RTT{top}"),
            self.srtt.clone(),
        );
        r.register(
            "cc_top_loss_ratio",
            format!("Segments declared lost / segments sent{top}"),
            self.loss_ratio.clone(),
        );
        r.register(
            "cc_top_retrans_ratio",
            format!("Retransmitted segments / segments sent{top}"),
            self.retrans_ratio.clone(),
        );
        r.register(
            "cc_top_cwnd_bytes",
            format!("Congestion window, bytes (absent: no congestion window){top}"),
            self.cwnd.clone(),
        );
        r.register(
            "cc_top_inflight_bytes",
            format!("Unacknowledged bytes in flight{top}"),
            self.inflight.clone(),
        );
    }

    fn set(&self, rank: usize, t: &CcTopSession) {
        let l = l2("rank", &rank.to_string(), "peer", &t.peer.to_string());
        let s = &t.stats;
        set_g(&self.pacing_rate, &l, s.pacing_rate);
        set_g(&self.btl_bw, &l, s.btl_bw);
        set_g(&self.delivery_rate, &l, s.delivery_rate);
        self.min_rtt
            .get_or_create(&l)
            .set(f64::from(s.min_rtt_ms) / 1000.0);
        self.srtt
            .get_or_create(&l)
            .set(f64::from(s.srtt_ms) / 1000.0);
        self.loss_ratio
            .get_or_create(&l)
            .set(finite_or_zero(s.loss_ratio));
        self.retrans_ratio
            .get_or_create(&l)
            .set(finite_or_zero(s.retrans_ratio));
        if s.cwnd_bytes != u64::MAX {
            set_g(&self.cwnd, &l, s.cwnd_bytes);
        }
        set_g(&self.inflight, &l, s.inflight_bytes);
    }
}

fn finite_or_zero(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family of [`METRIC_NAMES`] registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("paqet");
        let m = Metrics {
            registry: Registry::default(),
            encoding: Mutex::new(()),
            build_info: Family::default(),
            mode: Family::default(),
            sessions: Family::default(),
            streams: Gauge::default(),
            session_opens: Counter::default(),
            session_closes: Counter::default(),
            session_replacements: Counter::default(),
            stream_opens: Counter::default(),
            bytes: Family::default(),
            packets: Family::default(),
            tx_failures: Family::default(),
            retrans: Family::default(),
            srtt: Family::default(),
            crypto: Family::default(),
            envelope: Family::default(),
            session_errors: Family::default(),
            guard_drops: Counter::default(),
            limits: Family::default(),
            limit_refusals: Family::default(),
            streams_refused: Family::default(),
            socks5_udp_channels: Gauge::default(),
            reverse_connections: Family::default(),
            reverse_refusals: Family::default(),
            pcap_drops: Family::default(),
            worker_packets: Family::default(),
            worker_sessions: Family::default(),
            server_up: Family::default(),
            server_sessions: Family::default(),
            server_dial_failures: Family::default(),
            worker_handoffs: Family::default(),
            xdp: Family::default(),
            afxdp: Family::default(),
            cc_sessions: Family::default(),
            cc_pacing_rate: Gauge::default(),
            cc_delivery_rate: Gauge::default(),
            cc_srtt: Family::default(),
            cc_min_rtt: Family::default(),
            cc_sent_bytes: Counter::default(),
            cc_delivered_bytes: Counter::default(),
            cc_spurious: Counter::default(),
            cc_window_limited: Family::default(),
            cc_window_limited_total: Family::default(),
            cc_top: CcTopFamilies::default(),
        };
        r.register(
            "build_info",
            "Always 1; labels: version, commit (git, or unknown), dirty (uncommitted changes at build time), wire (upstream paqet protocol version), features (data paths built in: xdp,pcap or pcap)",
            m.build_info.clone(),
        );
        r.register(
            "datapath_mode",
            "1 for the packet path in use (label mode), 0 for the others",
            m.mode.clone(),
        );
        r.register("sessions", "Live KCP sessions", m.sessions.clone());
        r.register("streams", "Open smux streams", m.streams.clone());
        r.register(
            "session_opens",
            "KCP sessions opened",
            m.session_opens.clone(),
        );
        r.register(
            "session_closes",
            "KCP sessions closed",
            m.session_closes.clone(),
        );
        r.register(
            "session_replacements",
            "Server: sessions replaced by a new conv from the same peer",
            m.session_replacements.clone(),
        );
        r.register(
            "stream_opens",
            "smux streams opened",
            m.stream_opens.clone(),
        );
        r.register(
            "bytes",
            "Bytes of tunnel frames by direction (rx, tx)",
            m.bytes.clone(),
        );
        r.register(
            "packets",
            "Tunnel frames by direction (rx, tx)",
            m.packets.clone(),
        );
        r.register(
            "tx_failures",
            "Frames not sent, by reason (error: refused by the kernel, queue_full: TX path full)",
            m.tx_failures.clone(),
        );
        r.register(
            "kcp_retransmissions",
            "KCP segments retransmitted, by kind (timeout, fast, early)",
            m.retrans.clone(),
        );
        r.register(
            "kcp_srtt_seconds",
            "KCP smoothed round-trip time over live sessions (stat: min, mean, max)",
            m.srtt.clone(),
        );
        r.register(
            "crypto_failures",
            "Datagrams failing decryption, by reason (integrity, truncated; noise_<drop reason> with block = noise)",
            m.crypto.clone(),
        );
        r.register(
            "envelope_errors",
            "Frames rejected before decryption, by reason (malformed, truncated, foreign_source)",
            m.envelope.clone(),
        );
        r.register(
            "session_errors",
            "Decrypted datagrams dropped, by reason (no_session, replay, protocol)",
            m.session_errors.clone(),
        );
        r.register(
            "guard_drops",
            "Payloads without a valid guard cookie",
            m.guard_drops.clone(),
        );
        r.register(
            "limit_rejections",
            "Sessions or streams refused by a limit (limit: max_sessions, max_streams, header_timeout)",
            m.limits.clone(),
        );
        r.register(
            "limit_refusals",
            "Sessions or streams refused by a server limit, by its configuration key (key: transport.kcp.max_sessions, max_streams_total, max_streams_per_session, header_timeout)",
            m.limit_refusals.clone(),
        );
        r.register(
            "streams_refused",
            "Server streams refused by policy (reason: target_denied = server.allow / server.deny)",
            m.streams_refused.clone(),
        );
        r.register(
            "socks5_udp_channels",
            "Client: live SOCKS5 UDP ASSOCIATE datagram channels (one per client address and target, each with its idle timer)",
            m.socks5_udp_channels.clone(),
        );
        r.register(
            "reverse_connections",
            "Connections (TCP) or sources (UDP) carried by a reverse forward (name: the client's reverse[].name, the server's protocol/listen address)",
            m.reverse_connections.clone(),
        );
        r.register(
            "reverse_refusals",
            "Reverse forwards refused (reason: disabled, not_allowed, unavailable, invalid, unsupported = the server did not answer, other)",
            m.reverse_refusals.clone(),
        );
        r.register(
            "pcap_kernel_drops",
            "Frames dropped by the kernel before capture (counter: ps_drop, ps_ifdrop)",
            m.pcap_drops.clone(),
        );
        r.register(
            "worker_packets",
            "Tunnel frames per worker and direction",
            m.worker_packets.clone(),
        );
        r.register(
            "worker_sessions",
            "Live sessions per worker",
            m.worker_sessions.clone(),
        );
        r.register(
            "server_up",
            "Client: 1 while a configured server is healthy (sessions are placed on it), 0 while it is out",
            m.server_up.clone(),
        );
        r.register(
            "server_sessions",
            "Client: transport.conn sessions placed on each server",
            m.server_sessions.clone(),
        );
        r.register(
            "server_dial_failures",
            "Client: dials to each server that failed",
            m.server_dial_failures.clone(),
        );
        r.register(
            "worker_handoffs",
            "XDP mode: frames a worker received for another worker's session (result: handed, dropped)",
            m.worker_handoffs.clone(),
        );
        r.register(
            "xdp_packets",
            "XDP program counters (counter: seen, steered, passed, malformed, guard_dropped, no_socket, probe_answered, empty)",
            m.xdp.clone(),
        );
        r.register(
            "afxdp_socket_events",
            "AF_XDP socket statistics per worker (counter: rx_dropped, rx_ring_full, fill_ring_empty, tx_invalid_descs)",
            m.afxdp.clone(),
        );
        r.register(
            "cc_sessions",
            "Live KCP sessions by congestion control algorithm (bbr, fixed, off) and state",
            m.cc_sessions.clone(),
        );
        r.register(
            "cc_pacing_rate_bytes_per_second",
            "Sum of the live sessions' pacing rates, bytes/s (unpaced sessions count 0)",
            m.cc_pacing_rate.clone(),
        );
        r.register(
            "cc_delivery_rate_bytes_per_second",
            "Sum of the live sessions' latest delivery-rate samples, bytes/s",
            m.cc_delivery_rate.clone(),
        );
        r.register(
            "cc_srtt_seconds",
            "Smoothed RTT over live sessions with a sample (stat: min, median, max)",
            m.cc_srtt.clone(),
        );
        r.register(
            "cc_min_rtt_seconds",
            "Minimum RTT (propagation delay estimate) over live sessions with a sample (stat: min, median, max)",
            m.cc_min_rtt.clone(),
        );
        r.register(
            "cc_sent_bytes",
            "KCP data (PUSH payload) bytes sent, retransmissions included",
            m.cc_sent_bytes.clone(),
        );
        r.register(
            "cc_delivered_bytes",
            "KCP data (PUSH payload) bytes acknowledged by the peer",
            m.cc_delivered_bytes.clone(),
        );
        r.register(
            "cc_spurious_retransmissions",
            "KCP retransmissions found spurious (the original transmission was acknowledged)",
            m.cc_spurious.clone(),
        );
        r.register(
            "cc_window_limited_sessions",
            "Live sessions held below the path's bandwidth-delay product by a window (by: sndwnd, peer_rcvwnd)",
            m.cc_window_limited.clone(),
        );
        r.register(
            "cc_window_limited",
            "Sessions that became window-limited, each counted once (by: sndwnd, peer_rcvwnd)",
            m.cc_window_limited_total.clone(),
        );
        m.cc_top.register(&mut r);
        Metrics { registry: r, ..m }
    }

    /// Copies `s` into the families and renders them as OpenMetrics text (ends with `# EOF`).
    pub fn encode(&self, s: &Snapshot) -> String {
        let _serial = self.encoding.lock().unwrap_or_else(|e| e.into_inner());
        self.update(s);
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail; a formatter error would only come from a metric's own encoder.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }

    /// The `paqet_cc_*` families: aggregates over every worker's sessions and the global top list.
    fn update_cc(&self, s: &Snapshot) {
        let mut states: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        let (mut pacing, mut delivery, mut sent, mut delivered, mut spurious) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut limited, mut limited_total) = ([0u64; 2], [0u64; 2]);
        let mut srtt = Vec::new();
        let mut min_rtt = Vec::new();
        let mut top = Vec::with_capacity(s.workers.len() * CC_TOP_N);
        for w in &s.workers {
            let c = &w.cc;
            for (alg, state, n) in &c.states {
                *states.entry((alg.to_string(), state)).or_default() += n;
            }
            pacing = pacing.saturating_add(c.pacing_rate);
            delivery = delivery.saturating_add(c.delivery_rate);
            sent = sent.saturating_add(c.bytes_sent);
            delivered = delivered.saturating_add(c.bytes_delivered);
            spurious = spurious.saturating_add(c.spurious_retrans);
            for i in 0..WINDOW_LIMITED_BY.len() {
                limited[i] += c.window_limited[i];
                limited_total[i] += c.window_limited_total[i];
            }
            srtt.extend_from_slice(&c.srtt_seconds);
            min_rtt.extend_from_slice(&c.min_rtt_seconds);
            // Each worker's list is its own top N, so the global top N is among their union.
            top.extend(c.top.iter().take(CC_TOP_N).copied());
        }
        // Algorithm/state pairs that no session is in any more lose their series (like vanished workers).
        self.cc_sessions.clear();
        for ((alg, state), n) in &states {
            set_g(&self.cc_sessions, &l2("algorithm", alg, "state", state), *n);
        }
        self.cc_pacing_rate
            .set(i64::try_from(pacing).unwrap_or(i64::MAX));
        self.cc_delivery_rate
            .set(i64::try_from(delivery).unwrap_or(i64::MAX));
        for (fam, v) in [(&self.cc_srtt, &srtt), (&self.cc_min_rtt, &min_rtt)] {
            let (min, median, max) = min_median_max(v);
            fam.get_or_create(&l1("stat", "min")).set(min);
            fam.get_or_create(&l1("stat", "median")).set(median);
            fam.get_or_create(&l1("stat", "max")).set(max);
        }
        self.cc_sent_bytes.inner().store(sent, Ordering::Relaxed);
        self.cc_delivered_bytes
            .inner()
            .store(delivered, Ordering::Relaxed);
        self.cc_spurious.inner().store(spurious, Ordering::Relaxed);
        for (i, by) in WINDOW_LIMITED_BY.iter().enumerate() {
            set_g(&self.cc_window_limited, &l1("by", by), limited[i]);
            set_c(
                &self.cc_window_limited_total,
                &l1("by", by),
                limited_total[i],
            );
        }
        // Sessions that left the top list or went away lose their series: rebuild them.
        sort_top(&mut top);
        self.cc_top.clear();
        for (i, t) in top.iter().enumerate() {
            self.cc_top.set(i + 1, t);
        }
    }

    fn update(&self, s: &Snapshot) {
        // Process-wide, counted where the server refuses the stream (not part of a worker's snapshot).
        set_c(
            &self.streams_refused,
            &l1("reason", "target_denied"),
            crate::config::targets::target_refusals(),
        );
        // Process-wide, counted by the SOCKS5 front end's reply tasks.
        self.socks5_udp_channels
            .set(i64::try_from(crate::front::socks5::udp_channels()).unwrap_or(i64::MAX));
        for (name, v) in crate::worker::reverse::connections() {
            set_c(&self.reverse_connections, &l1("name", &name), v);
        }
        let refused = crate::worker::reverse::refusals();
        for reason in crate::worker::reverse::REFUSAL_REASONS {
            let v = refused
                .iter()
                .find(|(r, _)| r == &reason)
                .map_or(0, |(_, v)| *v);
            set_c(&self.reverse_refusals, &l1("reason", reason), v);
        }
        let mut t = WorkerSnapshot::default();
        let mut srtt: Vec<f64> = Vec::new();
        for w in &s.workers {
            t.sessions += w.sessions;
            t.streams += w.streams;
            t.session_opens += w.session_opens;
            t.session_closes += w.session_closes;
            t.session_replacements += w.session_replacements;
            t.stream_opens += w.stream_opens;
            t.rx_packets += w.rx_packets;
            t.rx_bytes += w.rx_bytes;
            t.tx_packets += w.tx_packets;
            t.tx_bytes += w.tx_bytes;
            t.tx_errors += w.tx_errors;
            t.tx_queue_full += w.tx_queue_full;
            t.kcp_retrans.timeout += w.kcp_retrans.timeout;
            t.kcp_retrans.fast += w.kcp_retrans.fast;
            t.kcp_retrans.early += w.kcp_retrans.early;
            t.crypto_integrity += w.crypto_integrity;
            t.crypto_truncated += w.crypto_truncated;
            t.envelope_malformed += w.envelope_malformed;
            t.envelope_truncated += w.envelope_truncated;
            t.envelope_foreign += w.envelope_foreign;
            t.no_session += w.no_session;
            t.replay += w.replay;
            t.session_protocol_errors += w.session_protocol_errors;
            t.guard_drops += w.guard_drops;
            t.limit_max_sessions += w.limit_max_sessions;
            t.limit_max_streams += w.limit_max_streams;
            t.limit_header_timeout += w.limit_header_timeout;
            for (sum, v) in t.limit_refusals.iter_mut().zip(w.limit_refusals) {
                *sum += v;
            }
            t.pcap_ps_drop += w.pcap_ps_drop;
            t.pcap_ps_ifdrop += w.pcap_ps_ifdrop;
            t.noise.add(&w.noise);
            srtt.extend(w.srtt_seconds.iter().copied().filter(|v| v.is_finite()));
        }
        self.update_cc(s);

        let b = &BUILD;
        set_g(
            &self.build_info,
            &vec![
                ("version", b.version.to_owned()),
                ("commit", b.commit.to_owned()),
                ("dirty", b.dirty.to_owned()),
                ("wire", b.wire.to_owned()),
                ("features", b.features().to_owned()),
            ],
            1,
        );
        for m in DataPathMode::ALL {
            set_g(&self.mode, &l1("mode", m.name()), u64::from(m == s.mode));
        }
        for r in [RoleLabel::Client, RoleLabel::Server] {
            let v = if r == s.role { t.sessions } else { 0 };
            set_g(&self.sessions, &l1("role", r.name()), v);
        }
        self.streams
            .set(i64::try_from(t.streams).unwrap_or(i64::MAX));
        self.session_opens
            .inner()
            .store(t.session_opens, Ordering::Relaxed);
        self.session_closes
            .inner()
            .store(t.session_closes, Ordering::Relaxed);
        self.session_replacements
            .inner()
            .store(t.session_replacements, Ordering::Relaxed);
        self.stream_opens
            .inner()
            .store(t.stream_opens, Ordering::Relaxed);
        set_c(&self.bytes, &l1("direction", "rx"), t.rx_bytes);
        set_c(&self.bytes, &l1("direction", "tx"), t.tx_bytes);
        set_c(&self.packets, &l1("direction", "rx"), t.rx_packets);
        set_c(&self.packets, &l1("direction", "tx"), t.tx_packets);
        set_c(&self.tx_failures, &l1("reason", "error"), t.tx_errors);
        set_c(
            &self.tx_failures,
            &l1("reason", "queue_full"),
            t.tx_queue_full,
        );
        set_c(&self.retrans, &l1("kind", "timeout"), t.kcp_retrans.timeout);
        set_c(&self.retrans, &l1("kind", "fast"), t.kcp_retrans.fast);
        set_c(&self.retrans, &l1("kind", "early"), t.kcp_retrans.early);
        let (min, mean, max) = if srtt.is_empty() {
            (0.0, 0.0, 0.0)
        } else {
            let min = srtt.iter().copied().fold(f64::INFINITY, f64::min);
            let max = srtt.iter().copied().fold(0.0, f64::max);
            (min, srtt.iter().sum::<f64>() / srtt.len() as f64, max)
        };
        self.srtt.get_or_create(&l1("stat", "min")).set(min);
        self.srtt.get_or_create(&l1("stat", "mean")).set(mean);
        self.srtt.get_or_create(&l1("stat", "max")).set(max);
        set_c(&self.crypto, &l1("reason", "integrity"), t.crypto_integrity);
        set_c(&self.crypto, &l1("reason", "truncated"), t.crypto_truncated);
        // The noise wire's drops, by `DropReason` label (series appear with the first drop).
        for (label, n) in t.noise.nonzero_drops() {
            set_c(&self.crypto, &l1("reason", &format!("noise_{label}")), n);
        }
        set_c(
            &self.envelope,
            &l1("reason", "malformed"),
            t.envelope_malformed,
        );
        set_c(
            &self.envelope,
            &l1("reason", "truncated"),
            t.envelope_truncated,
        );
        set_c(
            &self.envelope,
            &l1("reason", "foreign_source"),
            t.envelope_foreign,
        );
        set_c(
            &self.session_errors,
            &l1("reason", "no_session"),
            t.no_session,
        );
        set_c(&self.session_errors, &l1("reason", "replay"), t.replay);
        set_c(
            &self.session_errors,
            &l1("reason", "protocol"),
            t.session_protocol_errors,
        );
        self.guard_drops
            .inner()
            .store(t.guard_drops, Ordering::Relaxed);
        set_c(
            &self.limits,
            &l1("limit", "max_sessions"),
            t.limit_max_sessions,
        );
        set_c(
            &self.limits,
            &l1("limit", "max_streams"),
            t.limit_max_streams,
        );
        set_c(
            &self.limits,
            &l1("limit", "header_timeout"),
            t.limit_header_timeout,
        );
        for key in LimitKey::ALL {
            set_c(
                &self.limit_refusals,
                &l1("key", key.key()),
                t.limit_refusals[key.index()],
            );
        }
        set_c(&self.pcap_drops, &l1("counter", "ps_drop"), t.pcap_ps_drop);
        set_c(
            &self.pcap_drops,
            &l1("counter", "ps_ifdrop"),
            t.pcap_ps_ifdrop,
        );

        // Per-server series (client): summed over the workers; a server is up unless a worker that
        // places sessions took it out.
        self.server_up.clear();
        self.server_sessions.clear();
        self.server_dial_failures.clear();
        let mut per: Vec<(String, bool, bool, u64, u64)> = Vec::new();
        for v in s.workers.iter().flat_map(|w| w.servers.iter()) {
            let i = match per.iter().position(|p| p.0 == v.server) {
                Some(i) => i,
                None => {
                    per.push((v.server.clone(), true, false, 0, 0));
                    per.len() - 1
                }
            };
            let p = &mut per[i];
            if v.slots > 0 {
                p.1 &= v.up;
                p.2 = true;
            }
            p.3 += v.sessions;
            p.4 += v.dial_failures;
        }
        for (server, up, _, sessions, failures) in &per {
            let l = l1("server", server);
            set_g(&self.server_up, &l, u64::from(*up));
            set_g(&self.server_sessions, &l, *sessions);
            set_c(&self.server_dial_failures, &l, *failures);
        }

        // Per-worker series: the worker set can change between scrapes, so rebuild them.
        self.worker_packets.clear();
        self.worker_sessions.clear();
        self.worker_handoffs.clear();
        self.afxdp.clear();
        for (i, w) in s.workers.iter().enumerate() {
            let id = i.to_string();
            set_c(
                &self.worker_packets,
                &l2("worker", &id, "direction", "rx"),
                w.rx_packets,
            );
            set_c(
                &self.worker_packets,
                &l2("worker", &id, "direction", "tx"),
                w.tx_packets,
            );
            set_g(&self.worker_sessions, &l1("worker", &id), w.sessions);
            set_c(
                &self.worker_handoffs,
                &l2("worker", &id, "result", "handed"),
                w.rx_cross_worker,
            );
            set_c(
                &self.worker_handoffs,
                &l2("worker", &id, "result", "dropped"),
                w.rx_handoff_drops,
            );
            if let Some(a) = &w.afxdp {
                set_c(
                    &self.afxdp,
                    &l2("worker", &id, "counter", "rx_dropped"),
                    a.rx_dropped,
                );
                set_c(
                    &self.afxdp,
                    &l2("worker", &id, "counter", "rx_ring_full"),
                    a.rx_ring_full,
                );
                set_c(
                    &self.afxdp,
                    &l2("worker", &id, "counter", "fill_ring_empty"),
                    a.fill_ring_empty,
                );
                set_c(
                    &self.afxdp,
                    &l2("worker", &id, "counter", "tx_invalid_descs"),
                    a.tx_invalid_descs,
                );
            }
        }
        self.xdp.clear();
        if let Some(x) = &s.xdp {
            for c in XdpCounter::ALL {
                set_c(&self.xdp, &l1("counter", c.name()), x[c as usize]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .map(|l| l[series.len() + 1..].to_string())
    }

    #[test]
    fn totals_and_labels() {
        let mut w0 = WorkerSnapshot::from_daemon(
            &DaemonStats {
                rx_guard_drops: 7,
                sessions_rejected: 2,
                streams_rejected: 3,
                limit_refusals: [2, 0, 3, 1],
                rx_cross_worker: 11,
                rx_handoff_drops: 1,
                ..Default::default()
            },
            &IoStats {
                rx_frames: 10,
                rx_bytes: 1000,
                kernel_drops: 3,
                ..Default::default()
            },
        );
        w0.sessions = 2;
        w0.srtt_seconds = vec![0.010, 0.030];
        w0.cc.add_session(
            "10.0.0.9:4000".parse().unwrap(),
            &cc(CcAlgorithm::Bbr, "probe_bw", 1_000, 20, 4096),
        );
        w0.cc.finish();
        let server = |addr: &str, up: bool, slots: u64, sessions: u64, fails: u64| ServerSnapshot {
            server: addr.to_string(),
            up,
            slots,
            sessions,
            dial_failures: fails,
        };
        w0.servers = vec![
            server("10.0.0.2:9999", true, 2, 1, 0),
            server("10.0.0.3:9999", false, 2, 0, 2),
        ];
        let mut w1 = WorkerSnapshot {
            rx_packets: 5,
            rx_bytes: 500,
            sessions: 1,
            // A worker without slots does not judge health: server 2 stays down.
            servers: vec![
                server("10.0.0.2:9999", true, 1, 1, 1),
                server("10.0.0.3:9999", true, 0, 0, 0),
            ],
            ..Default::default()
        };
        w1.afxdp = Some(AfXdpStats {
            rx_ring_full: 4,
            ..Default::default()
        });
        let mut xdp = [0u64; XdpCounter::COUNT as usize];
        xdp[XdpCounter::GuardDropped as usize] = 9;
        let s = Snapshot {
            role: RoleLabel::Server,
            mode: DataPathMode::XdpGeneric,
            workers: vec![w0, w1],
            xdp: Some(xdp),
        };
        let m = Metrics::new();
        crate::worker::reverse::count_connection("metrics-test");
        let t = m.encode(&s);
        assert_eq!(
            sample_value(&t, "paqet_packets_total{direction=\"rx\"}").as_deref(),
            Some("15")
        );
        assert_eq!(
            sample_value(&t, "paqet_bytes_total{direction=\"rx\"}").as_deref(),
            Some("1500")
        );
        assert_eq!(
            sample_value(&t, "paqet_sessions{role=\"server\"}").as_deref(),
            Some("3")
        );
        assert_eq!(
            sample_value(&t, "paqet_sessions{role=\"client\"}").as_deref(),
            Some("0")
        );
        assert_eq!(
            sample_value(&t, "paqet_guard_drops_total").as_deref(),
            Some("7")
        );
        assert_eq!(
            sample_value(&t, "paqet_limit_rejections_total{limit=\"max_sessions\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample_value(&t, "paqet_limit_rejections_total{limit=\"header_timeout\"}").as_deref(),
            Some("1")
        );
        for (key, v) in [
            ("max_sessions", "2"),
            ("max_streams_total", "0"),
            ("max_streams_per_session", "3"),
            ("header_timeout", "1"),
        ] {
            let series = format!("paqet_limit_refusals_total{{key=\"transport.kcp.{key}\"}}");
            assert_eq!(sample_value(&t, &series).as_deref(), Some(v), "{series}");
        }
        assert_eq!(
            sample_value(&t, "paqet_pcap_kernel_drops_total{counter=\"ps_drop\"}").as_deref(),
            Some("3")
        );
        assert_eq!(
            sample_value(&t, "paqet_datapath_mode{mode=\"xdp-generic\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            sample_value(&t, "paqet_datapath_mode{mode=\"pcap\"}").as_deref(),
            Some("0")
        );
        assert_eq!(
            sample_value(&t, "paqet_xdp_packets_total{counter=\"guard_dropped\"}").as_deref(),
            Some("9")
        );
        assert_eq!(
            sample_value(
                &t,
                "paqet_afxdp_socket_events_total{worker=\"1\",counter=\"rx_ring_full\"}"
            )
            .as_deref(),
            Some("4")
        );
        assert_eq!(
            sample_value(&t, "paqet_worker_sessions{worker=\"0\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample_value(
                &t,
                "paqet_worker_handoffs_total{worker=\"0\",result=\"handed\"}"
            )
            .as_deref(),
            Some("11")
        );
        assert_eq!(
            sample_value(
                &t,
                "paqet_worker_handoffs_total{worker=\"0\",result=\"dropped\"}"
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample_value(
                &t,
                "paqet_worker_handoffs_total{worker=\"1\",result=\"handed\"}"
            )
            .as_deref(),
            Some("0")
        );
        for (sample, want) in [
            ("paqet_server_up{server=\"10.0.0.2:9999\"}", "1"),
            ("paqet_server_up{server=\"10.0.0.3:9999\"}", "0"),
            ("paqet_server_sessions{server=\"10.0.0.2:9999\"}", "2"),
            (
                "paqet_server_dial_failures_total{server=\"10.0.0.2:9999\"}",
                "1",
            ),
            (
                "paqet_server_dial_failures_total{server=\"10.0.0.3:9999\"}",
                "2",
            ),
        ] {
            assert_eq!(sample_value(&t, sample).as_deref(), Some(want), "{sample}");
        }
        let mean: f64 = sample_value(&t, "paqet_kcp_srtt_seconds{stat=\"mean\"}")
            .unwrap()
            .parse()
            .unwrap();
        assert!((mean - 0.020).abs() < 1e-9, "mean srtt {mean}");
        for name in METRIC_NAMES {
            assert!(
                t.lines().any(|l| l.starts_with(name)
                    && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))),
                "{name} missing in:\n{t}"
            );
        }
        assert!(t.ends_with("# EOF\n"));
    }

    /// Session figures with the fields the tests vary.
    fn cc(
        algorithm: CcAlgorithm,
        state: &'static str,
        delivery_rate: u64,
        srtt_ms: u32,
        cwnd_bytes: u64,
    ) -> CcStats {
        CcStats {
            algorithm,
            state,
            pacing_rate: delivery_rate + delivery_rate / 4,
            btl_bw: delivery_rate,
            delivery_rate,
            min_rtt_ms: srtt_ms / 2,
            srtt_ms,
            cwnd_bytes,
            inflight_bytes: cwnd_bytes / 2,
            bytes_sent: 1000,
            bytes_delivered: 900,
            loss_ratio: 0.01,
            retrans_ratio: 0.02,
            spurious_retrans: 3,
            ..CcStats::default()
        }
    }

    fn peer(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 40_000 + i as u16))
    }

    fn worker_with(sessions: &[(SocketAddr, CcStats)]) -> WorkerSnapshot {
        let mut w = WorkerSnapshot {
            sessions: sessions.len() as u64,
            ..Default::default()
        };
        for (p, s) in sessions {
            w.cc.add_session(*p, s);
        }
        w.cc.finish();
        w
    }

    fn value(text: &str, series: &str) -> f64 {
        sample_value(text, series)
            .unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn cc_aggregates() {
        let mut limited = cc(CcAlgorithm::Bbr, "startup", 2_000_000, 40, 100_000);
        limited.window_limited_by = Some("sndwnd");
        let mut peer_limited = cc(CcAlgorithm::Fixed, "fixed", 500_000, 10, 50_000);
        peer_limited.window_limited_by = Some("peer_rcvwnd");
        let mut w0 = worker_with(&[
            (
                peer(1),
                cc(CcAlgorithm::Bbr, "probe_bw", 1_000_000, 20, 64_000),
            ),
            (peer(2), limited),
            (peer(3), cc(CcAlgorithm::Off, "off", 0, 0, u64::MAX)),
        ]);
        w0.cc.add_retired(5_000, 4_000, 7);
        w0.cc.window_limited_total = [2, 0];
        let fast = cc(CcAlgorithm::Bbr, "probe_bw", 3_000_000, 30, 1);
        let mut w1 = worker_with(&[(peer(4), peer_limited), (peer(5), fast)]);
        w1.cc.window_limited_total = [0, 1];
        let m = Metrics::new();
        let t = m.encode(&Snapshot {
            workers: vec![w0, w1],
            ..Default::default()
        });
        assert_eq!(
            value(
                &t,
                "paqet_cc_sessions{algorithm=\"bbr\",state=\"probe_bw\"}"
            ),
            2.0
        );
        assert_eq!(
            value(&t, "paqet_cc_sessions{algorithm=\"bbr\",state=\"startup\"}"),
            1.0
        );
        assert_eq!(
            value(&t, "paqet_cc_sessions{algorithm=\"fixed\",state=\"fixed\"}"),
            1.0
        );
        assert_eq!(
            value(&t, "paqet_cc_sessions{algorithm=\"off\",state=\"off\"}"),
            1.0
        );
        assert_eq!(
            value(&t, "paqet_cc_delivery_rate_bytes_per_second"),
            6_500_000.0
        );
        assert_eq!(
            value(&t, "paqet_cc_pacing_rate_bytes_per_second"),
            (6_500_000 + 6_500_000 / 4) as f64
        );
        // srtt: the off session has no sample (0): 10, 20, 30, 40 ms.
        assert_eq!(value(&t, "paqet_cc_srtt_seconds{stat=\"min\"}"), 0.010);
        assert!((value(&t, "paqet_cc_srtt_seconds{stat=\"median\"}") - 0.025).abs() < 1e-12);
        assert_eq!(value(&t, "paqet_cc_srtt_seconds{stat=\"max\"}"), 0.040);
        assert_eq!(
            value(&t, "paqet_cc_min_rtt_seconds{stat=\"median\"}"),
            0.0125
        );
        // 5 live sessions × 1000 / 900 plus the retired counters.
        assert_eq!(value(&t, "paqet_cc_sent_bytes_total"), 10_000.0);
        assert_eq!(value(&t, "paqet_cc_delivered_bytes_total"), 8_500.0);
        assert_eq!(value(&t, "paqet_cc_spurious_retransmissions_total"), 22.0);
        assert_eq!(
            value(&t, "paqet_cc_window_limited_sessions{by=\"sndwnd\"}"),
            1.0
        );
        assert_eq!(
            value(&t, "paqet_cc_window_limited_sessions{by=\"peer_rcvwnd\"}"),
            1.0
        );
        assert_eq!(
            value(&t, "paqet_cc_window_limited_total{by=\"sndwnd\"}"),
            2.0
        );
        assert_eq!(
            value(&t, "paqet_cc_window_limited_total{by=\"peer_rcvwnd\"}"),
            1.0
        );
        // The top list, by delivery rate across workers.
        let top = |f: &str, rank: usize, p: usize| {
            value(
                &t,
                &format!("paqet_cc_top_{f}{{rank=\"{rank}\",peer=\"{}\"}}", peer(p)),
            )
        };
        assert_eq!(top("delivery_rate_bytes_per_second", 1, 5), 3_000_000.0);
        assert_eq!(top("delivery_rate_bytes_per_second", 2, 2), 2_000_000.0);
        assert_eq!(top("delivery_rate_bytes_per_second", 3, 1), 1_000_000.0);
        assert_eq!(top("delivery_rate_bytes_per_second", 4, 4), 500_000.0);
        assert_eq!(top("delivery_rate_bytes_per_second", 5, 3), 0.0);
        assert_eq!(top("pacing_rate_bytes_per_second", 2, 2), 2_500_000.0);
        assert_eq!(top("btl_bw_bytes_per_second", 2, 2), 2_000_000.0);
        assert_eq!(top("srtt_seconds", 2, 2), 0.040);
        assert_eq!(top("min_rtt_seconds", 2, 2), 0.020);
        assert_eq!(top("loss_ratio", 2, 2), 0.01);
        assert_eq!(top("retrans_ratio", 2, 2), 0.02);
        assert_eq!(top("cwnd_bytes", 2, 2), 100_000.0);
        assert_eq!(top("inflight_bytes", 2, 2), 50_000.0);
        // No congestion window (cc off): no cwnd series for that rank.
        assert!(sample_value(
            &t,
            &format!("paqet_cc_top_cwnd_bytes{{rank=\"5\",peer=\"{}\"}}", peer(3))
        )
        .is_none());
    }

    #[test]
    fn cc_top_list_is_bounded() {
        // 12 sessions over 3 workers with distinct delivery rates; each worker keeps at most CC_TOP_N.
        let mut workers = Vec::new();
        for w in 0..3 {
            let sessions: Vec<(SocketAddr, CcStats)> = (0..4)
                .map(|i| {
                    let n = w * 4 + i;
                    (
                        peer(n),
                        cc(
                            CcAlgorithm::Bbr,
                            "probe_bw",
                            1_000 * (n as u64 + 1),
                            10,
                            1_000,
                        ),
                    )
                })
                .collect();
            let w = worker_with(&sessions);
            assert!(w.cc.top.len() <= CC_TOP_N);
            workers.push(w);
        }
        let mut many = CcSnapshot::default();
        for i in 0..1000 {
            many.add_session(
                peer(i % 60_000),
                &cc(CcAlgorithm::Bbr, "probe_bw", i as u64, 10, 1),
            );
            assert!(many.top.len() < 2 * CC_TOP_N, "candidate list stays short");
        }
        many.finish();
        let rates: Vec<u64> = many.top.iter().map(|t| t.stats.delivery_rate).collect();
        assert_eq!(rates, vec![999, 998, 997, 996, 995]);
        let m = Metrics::new();
        let t = m.encode(&Snapshot {
            workers,
            ..Default::default()
        });
        for f in [
            "delivery_rate_bytes_per_second",
            "srtt_seconds",
            "loss_ratio",
            "inflight_bytes",
        ] {
            let name = format!("paqet_cc_top_{f}{{");
            let n = t.lines().filter(|l| l.starts_with(&name)).count();
            assert_eq!(n, CC_TOP_N, "{f}:\n{t}");
        }
        for (rank, n) in (1..=CC_TOP_N).zip((7..12).rev()) {
            let series = format!(
                "paqet_cc_top_delivery_rate_bytes_per_second{{rank=\"{rank}\",peer=\"{}\"}}",
                peer(n)
            );
            assert_eq!(value(&t, &series), 1_000.0 * (n as f64 + 1.0));
        }
    }

    #[test]
    fn cc_series_of_gone_sessions_disappear() {
        let m = Metrics::new();
        let both = worker_with(&[
            (peer(1), cc(CcAlgorithm::Bbr, "startup", 9_000, 10, 1_000)),
            (peer(2), cc(CcAlgorithm::Fixed, "fixed", 1_000, 10, 1_000)),
        ]);
        let t = m.encode(&Snapshot {
            workers: vec![both],
            ..Default::default()
        });
        assert!(t.contains(&format!("rank=\"1\",peer=\"{}\"", peer(1))));
        assert!(t.contains(&format!("rank=\"2\",peer=\"{}\"", peer(2))));
        assert!(t.contains("paqet_cc_sessions{algorithm=\"bbr\",state=\"startup\"} 1"));
        // Session 1 goes; session 2 moves up to rank 1.
        let one = worker_with(&[(peer(2), cc(CcAlgorithm::Fixed, "fixed", 1_000, 10, 1_000))]);
        let t = m.encode(&Snapshot {
            workers: vec![one],
            ..Default::default()
        });
        assert!(!t.contains(&format!("peer=\"{}\"", peer(1))), "{t}");
        assert!(!t.contains("rank=\"2\""), "{t}");
        assert!(
            t.contains(&format!(
                "paqet_cc_top_srtt_seconds{{rank=\"1\",peer=\"{}\"}}",
                peer(2)
            )),
            "{t}"
        );
        assert!(!t.contains("state=\"startup\""), "{t}");
        // No session at all: no per-session series (an empty family is not rendered), aggregates at 0.
        let t = m.encode(&Snapshot {
            workers: vec![WorkerSnapshot::default()],
            ..Default::default()
        });
        assert!(!t.contains("rank=\""), "{t}");
        assert!(!t.contains("paqet_cc_sessions{"), "{t}");
        assert_eq!(value(&t, "paqet_cc_delivery_rate_bytes_per_second"), 0.0);
        assert_eq!(value(&t, "paqet_cc_srtt_seconds{stat=\"median\"}"), 0.0);
        assert_eq!(
            value(&t, "paqet_cc_window_limited_sessions{by=\"sndwnd\"}"),
            0.0
        );
    }

    #[test]
    fn median_of_odd_and_even_sets() {
        assert_eq!(min_median_max(&[]), (0.0, 0.0, 0.0));
        assert_eq!(min_median_max(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(min_median_max(&[4.0, 1.0, 3.0, 2.0]), (1.0, 2.5, 4.0));
        assert_eq!(min_median_max(&[f64::NAN, 5.0]), (5.0, 5.0, 5.0));
    }

    #[test]
    fn workers_that_vanish_lose_their_series() {
        let m = Metrics::new();
        let two = Snapshot {
            workers: vec![WorkerSnapshot::default(); 2],
            ..Default::default()
        };
        assert!(m
            .encode(&two)
            .contains("paqet_worker_sessions{worker=\"1\"}"));
        let one = Snapshot {
            workers: vec![WorkerSnapshot::default(); 1],
            ..Default::default()
        };
        let t = m.encode(&one);
        assert!(t.contains("paqet_worker_sessions{worker=\"0\"}"));
        assert!(!t.contains("worker=\"1\""));
        assert!(
            !t.contains("paqet_xdp_packets_total{"),
            "no XDP series in pcap mode"
        );
    }

    #[test]
    fn build_info_carries_commit_wire_and_features() {
        let t = Metrics::new().encode(&Snapshot::default());
        let line = t
            .lines()
            .find(|l| l.starts_with("paqet_build_info{"))
            .expect("a paqet_build_info sample");
        assert!(line.ends_with(" 1"), "{line}");
        for (k, v) in [
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", BUILD.commit),
            ("dirty", BUILD.dirty),
            ("wire", "v1.0.0-alpha.21"),
            ("features", BUILD.features()),
        ] {
            assert!(
                line.contains(&format!("{k}=\"{v}\"")),
                "{k}={v:?} not in {line}"
            );
        }
        // The build script stamps a git checkout with its commit (12 hex digits) and dirty flag.
        let in_git = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.git")
            .exists();
        let have_git = std::process::Command::new("git")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if in_git && have_git {
            assert_eq!(BUILD.commit.len(), 12, "{}", BUILD.commit);
            assert!(BUILD.commit.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(matches!(BUILD.dirty, "true" | "false"), "{}", BUILD.dirty);
        }
        assert_eq!(BUILD.xdp, crate::io::steer::has_xdp_program());
        assert_eq!(BUILD.features().contains("xdp"), BUILD.xdp);
    }
}
