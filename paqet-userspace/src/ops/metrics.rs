//! The Prometheus metrics registry and the [`Snapshot`] the daemon fills for it.
//!
//! Workers own plain `u64` counters (no atomics on the per-packet path). The exporter asks the daemon for a
//! [`Snapshot`] when it is scraped (a callback, see [`super::OpsState`]), and [`Metrics::encode`] copies the
//! snapshot into `prometheus-client` metric families and renders them as OpenMetrics text (which Prometheus
//! scrapes like text format 0.0.4). Every exported sample name is listed in [`METRIC_NAMES`].
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use paqet_common::XdpCounter;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::io::IoStats;
use crate::worker::core::DaemonStats;

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
    "paqet_pcap_kernel_drops_total",
    "paqet_worker_packets_total",
    "paqet_worker_sessions",
    "paqet_worker_handoffs_total",
    "paqet_xdp_packets_total",
    "paqet_afxdp_socket_events_total",
];

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
    pub const ALL: [DataPathMode; 3] = [DataPathMode::Pcap, DataPathMode::XdpNative, DataPathMode::XdpGeneric];

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

/// One worker's counters. All counters are cumulative since the worker started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSnapshot {
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
}

impl WorkerSnapshot {
    /// Fills the counters a worker keeps in [`DaemonStats`] and its I/O backends' [`IoStats`]; the gauges
    /// (`sessions`, `streams`), KCP figures and AF_XDP statistics are set by the caller.
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
            session_protocol_errors: d.rx_session_errors,
            guard_drops: d.rx_guard_drops,
            limit_max_sessions: d.sessions_rejected,
            limit_max_streams: d.streams_rejected,
            pcap_ps_drop: io.kernel_drops,
            pcap_ps_ifdrop: io.if_drops,
            rx_cross_worker: d.rx_cross_worker,
            rx_handoff_drops: d.rx_handoff_drops,
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
    f.get_or_create(labels).set(i64::try_from(v).unwrap_or(i64::MAX));
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
    pcap_drops: CounterFamily,
    worker_packets: CounterFamily,
    worker_sessions: GaugeFamily,
    worker_handoffs: CounterFamily,
    xdp: CounterFamily,
    afxdp: CounterFamily,
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
            pcap_drops: Family::default(),
            worker_packets: Family::default(),
            worker_sessions: Family::default(),
            worker_handoffs: Family::default(),
            xdp: Family::default(),
            afxdp: Family::default(),
        };
        r.register("build_info", "Always 1; label version is the paqet-dp version", m.build_info.clone());
        r.register("datapath_mode", "1 for the packet path in use (label mode), 0 for the others", m.mode.clone());
        r.register("sessions", "Live KCP sessions", m.sessions.clone());
        r.register("streams", "Open smux streams", m.streams.clone());
        r.register("session_opens", "KCP sessions opened", m.session_opens.clone());
        r.register("session_closes", "KCP sessions closed", m.session_closes.clone());
        r.register(
            "session_replacements",
            "Server: sessions replaced by a new conv from the same peer",
            m.session_replacements.clone(),
        );
        r.register("stream_opens", "smux streams opened", m.stream_opens.clone());
        r.register("bytes", "Bytes of tunnel frames by direction (rx, tx)", m.bytes.clone());
        r.register("packets", "Tunnel frames by direction (rx, tx)", m.packets.clone());
        r.register(
            "tx_failures",
            "Frames not sent, by reason (error: refused by the kernel, queue_full: TX path full)",
            m.tx_failures.clone(),
        );
        r.register("kcp_retransmissions", "KCP segments retransmitted, by kind (timeout, fast, early)", m.retrans.clone());
        r.register(
            "kcp_srtt_seconds",
            "KCP smoothed round-trip time over live sessions (stat: min, mean, max)",
            m.srtt.clone(),
        );
        r.register("crypto_failures", "Datagrams failing decryption, by reason (integrity, truncated)", m.crypto.clone());
        r.register(
            "envelope_errors",
            "Frames rejected before decryption, by reason (malformed, truncated, foreign_source)",
            m.envelope.clone(),
        );
        r.register(
            "session_errors",
            "Decrypted datagrams dropped, by reason (no_session, protocol)",
            m.session_errors.clone(),
        );
        r.register("guard_drops", "Payloads without a valid guard cookie", m.guard_drops.clone());
        r.register(
            "limit_rejections",
            "Sessions or streams refused by a limit (limit: max_sessions, max_streams, header_timeout)",
            m.limits.clone(),
        );
        r.register(
            "pcap_kernel_drops",
            "Frames dropped by the kernel before capture (counter: ps_drop, ps_ifdrop)",
            m.pcap_drops.clone(),
        );
        r.register("worker_packets", "Tunnel frames per worker and direction", m.worker_packets.clone());
        r.register("worker_sessions", "Live sessions per worker", m.worker_sessions.clone());
        r.register(
            "worker_handoffs",
            "XDP mode: frames a worker received for another worker's session (result: handed, dropped)",
            m.worker_handoffs.clone(),
        );
        r.register("xdp_packets", "XDP program counters (counter: seen, steered, passed, malformed, guard_dropped)", m.xdp.clone());
        r.register(
            "afxdp_socket_events",
            "AF_XDP socket statistics per worker (counter: rx_dropped, rx_ring_full, fill_ring_empty, tx_invalid_descs)",
            m.afxdp.clone(),
        );
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

    fn update(&self, s: &Snapshot) {
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
            t.session_protocol_errors += w.session_protocol_errors;
            t.guard_drops += w.guard_drops;
            t.limit_max_sessions += w.limit_max_sessions;
            t.limit_max_streams += w.limit_max_streams;
            t.limit_header_timeout += w.limit_header_timeout;
            t.pcap_ps_drop += w.pcap_ps_drop;
            t.pcap_ps_ifdrop += w.pcap_ps_ifdrop;
            srtt.extend(w.srtt_seconds.iter().copied().filter(|v| v.is_finite()));
        }

        set_g(&self.build_info, &l1("version", env!("CARGO_PKG_VERSION")), 1);
        for m in DataPathMode::ALL {
            set_g(&self.mode, &l1("mode", m.name()), u64::from(m == s.mode));
        }
        for r in [RoleLabel::Client, RoleLabel::Server] {
            let v = if r == s.role { t.sessions } else { 0 };
            set_g(&self.sessions, &l1("role", r.name()), v);
        }
        self.streams.set(i64::try_from(t.streams).unwrap_or(i64::MAX));
        self.session_opens.inner().store(t.session_opens, Ordering::Relaxed);
        self.session_closes.inner().store(t.session_closes, Ordering::Relaxed);
        self.session_replacements.inner().store(t.session_replacements, Ordering::Relaxed);
        self.stream_opens.inner().store(t.stream_opens, Ordering::Relaxed);
        set_c(&self.bytes, &l1("direction", "rx"), t.rx_bytes);
        set_c(&self.bytes, &l1("direction", "tx"), t.tx_bytes);
        set_c(&self.packets, &l1("direction", "rx"), t.rx_packets);
        set_c(&self.packets, &l1("direction", "tx"), t.tx_packets);
        set_c(&self.tx_failures, &l1("reason", "error"), t.tx_errors);
        set_c(&self.tx_failures, &l1("reason", "queue_full"), t.tx_queue_full);
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
        set_c(&self.envelope, &l1("reason", "malformed"), t.envelope_malformed);
        set_c(&self.envelope, &l1("reason", "truncated"), t.envelope_truncated);
        set_c(&self.envelope, &l1("reason", "foreign_source"), t.envelope_foreign);
        set_c(&self.session_errors, &l1("reason", "no_session"), t.no_session);
        set_c(&self.session_errors, &l1("reason", "protocol"), t.session_protocol_errors);
        self.guard_drops.inner().store(t.guard_drops, Ordering::Relaxed);
        set_c(&self.limits, &l1("limit", "max_sessions"), t.limit_max_sessions);
        set_c(&self.limits, &l1("limit", "max_streams"), t.limit_max_streams);
        set_c(&self.limits, &l1("limit", "header_timeout"), t.limit_header_timeout);
        set_c(&self.pcap_drops, &l1("counter", "ps_drop"), t.pcap_ps_drop);
        set_c(&self.pcap_drops, &l1("counter", "ps_ifdrop"), t.pcap_ps_ifdrop);

        // Per-worker series: the worker set can change between scrapes, so rebuild them.
        self.worker_packets.clear();
        self.worker_sessions.clear();
        self.worker_handoffs.clear();
        self.afxdp.clear();
        for (i, w) in s.workers.iter().enumerate() {
            let id = i.to_string();
            set_c(&self.worker_packets, &l2("worker", &id, "direction", "rx"), w.rx_packets);
            set_c(&self.worker_packets, &l2("worker", &id, "direction", "tx"), w.tx_packets);
            set_g(&self.worker_sessions, &l1("worker", &id), w.sessions);
            set_c(&self.worker_handoffs, &l2("worker", &id, "result", "handed"), w.rx_cross_worker);
            set_c(&self.worker_handoffs, &l2("worker", &id, "result", "dropped"), w.rx_handoff_drops);
            if let Some(a) = &w.afxdp {
                set_c(&self.afxdp, &l2("worker", &id, "counter", "rx_dropped"), a.rx_dropped);
                set_c(&self.afxdp, &l2("worker", &id, "counter", "rx_ring_full"), a.rx_ring_full);
                set_c(&self.afxdp, &l2("worker", &id, "counter", "fill_ring_empty"), a.fill_ring_empty);
                set_c(&self.afxdp, &l2("worker", &id, "counter", "tx_invalid_descs"), a.tx_invalid_descs);
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
                rx_cross_worker: 11,
                rx_handoff_drops: 1,
                ..Default::default()
            },
            &IoStats { rx_frames: 10, rx_bytes: 1000, kernel_drops: 3, ..Default::default() },
        );
        w0.sessions = 2;
        w0.srtt_seconds = vec![0.010, 0.030];
        let mut w1 = WorkerSnapshot { rx_packets: 5, rx_bytes: 500, sessions: 1, ..Default::default() };
        w1.afxdp = Some(AfXdpStats { rx_ring_full: 4, ..Default::default() });
        let mut xdp = [0u64; XdpCounter::COUNT as usize];
        xdp[XdpCounter::GuardDropped as usize] = 9;
        let s = Snapshot {
            role: RoleLabel::Server,
            mode: DataPathMode::XdpGeneric,
            workers: vec![w0, w1],
            xdp: Some(xdp),
        };
        let m = Metrics::new();
        let t = m.encode(&s);
        assert_eq!(sample_value(&t, "paqet_packets_total{direction=\"rx\"}").as_deref(), Some("15"));
        assert_eq!(sample_value(&t, "paqet_bytes_total{direction=\"rx\"}").as_deref(), Some("1500"));
        assert_eq!(sample_value(&t, "paqet_sessions{role=\"server\"}").as_deref(), Some("3"));
        assert_eq!(sample_value(&t, "paqet_sessions{role=\"client\"}").as_deref(), Some("0"));
        assert_eq!(sample_value(&t, "paqet_guard_drops_total").as_deref(), Some("7"));
        assert_eq!(sample_value(&t, "paqet_limit_rejections_total{limit=\"max_sessions\"}").as_deref(), Some("2"));
        assert_eq!(sample_value(&t, "paqet_pcap_kernel_drops_total{counter=\"ps_drop\"}").as_deref(), Some("3"));
        assert_eq!(sample_value(&t, "paqet_datapath_mode{mode=\"xdp-generic\"}").as_deref(), Some("1"));
        assert_eq!(sample_value(&t, "paqet_datapath_mode{mode=\"pcap\"}").as_deref(), Some("0"));
        assert_eq!(sample_value(&t, "paqet_xdp_packets_total{counter=\"guard_dropped\"}").as_deref(), Some("9"));
        assert_eq!(
            sample_value(&t, "paqet_afxdp_socket_events_total{worker=\"1\",counter=\"rx_ring_full\"}").as_deref(),
            Some("4")
        );
        assert_eq!(sample_value(&t, "paqet_worker_sessions{worker=\"0\"}").as_deref(), Some("2"));
        assert_eq!(
            sample_value(&t, "paqet_worker_handoffs_total{worker=\"0\",result=\"handed\"}").as_deref(),
            Some("11")
        );
        assert_eq!(
            sample_value(&t, "paqet_worker_handoffs_total{worker=\"0\",result=\"dropped\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            sample_value(&t, "paqet_worker_handoffs_total{worker=\"1\",result=\"handed\"}").as_deref(),
            Some("0")
        );
        let mean: f64 = sample_value(&t, "paqet_kcp_srtt_seconds{stat=\"mean\"}").unwrap().parse().unwrap();
        assert!((mean - 0.020).abs() < 1e-9, "mean srtt {mean}");
        for name in METRIC_NAMES {
            assert!(
                t.lines().any(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))),
                "{name} missing in:\n{t}"
            );
        }
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn workers_that_vanish_lose_their_series() {
        let m = Metrics::new();
        let two = Snapshot { workers: vec![WorkerSnapshot::default(); 2], ..Default::default() };
        assert!(m.encode(&two).contains("paqet_worker_sessions{worker=\"1\"}"));
        let one = Snapshot { workers: vec![WorkerSnapshot::default(); 1], ..Default::default() };
        let t = m.encode(&one);
        assert!(t.contains("paqet_worker_sessions{worker=\"0\"}"));
        assert!(!t.contains("worker=\"1\""));
        assert!(!t.contains("paqet_xdp_packets_total{"), "no XDP series in pcap mode");
    }
}
