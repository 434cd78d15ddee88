//! `paqet-dp dump`: decodes captured tunnel frames layer by layer with the configured key.
//!
//! For every frame [`Dumper::describe`] prints one block:
//!
//! ```text
//! [12:34:56.789012] 10.200.0.1:35748 -> 10.200.0.2:9999 (to port) | 142 bytes | TCP PA | payload 76
//!   crypto aes: crc ok, body 56 bytes
//!   kcp conv=552f9463 PUSH sn=0 una=0 wnd=512 ts=82 frg=0 len=32
//!     smux SYN sid=3 len=0
//!     smux PSH sid=3 len=8 paqet PTCPF [0x018]
//!     smux FIN sid=3 len=0
//! ```
//!
//! smux frames are found on each direction's KCP byte stream: the dumper remembers, per
//! (source address, conv), the next expected `sn` and how much of a frame that began in an earlier
//! segment is still to come, so a frame is shown in the segment where it starts. A segment that
//! arrives out of order is decoded best effort from its first byte. Anything that cannot be decoded
//! is shown as a hex dump. Decoding never panics on arbitrary bytes.
//!
//! ## Congestion figures per flow
//!
//! For each flow (direction source → destination, conv) the dumper also measures what the packets show
//! of its sender's congestion behaviour, and prints a summary line per flow every second of capture time
//! (for the second that ended, flows with segments in it), and at the end ([`Dumper::finish`]: the last,
//! partial second and the totals over the whole capture):
//!
//! ```text
//! [12:34:57.068875] summary 10.200.0.2:9999 -> 10.200.0.1:35748 conv=552f9463 | 1.000 s | data 65536 B/s, 49 segs | retrans 2/49 (4.1 %) | rtt 2.101 ms (min 1.900, max 2.500, 12 samples) | wnd 512, peer wnd 1024
//! ```
//!
//! - **data**: PUSH payload bytes per second (retransmissions included) and PUSH segments.
//! - **retrans**: PUSH segments whose `sn` was already seen on the flow / all PUSH segments. The flow
//!   remembers the last [`SN_HISTORY`] sequence numbers below the highest seen; an `sn` older than that
//!   counts as a retransmission.
//! - **rtt**: an ACK echoes the `ts` of the PUSH it acknowledges, so RTT at the capture point = capture
//!   time of the ACK − capture time of that PUSH transmission (a retransmission whose ACK echoes another
//!   transmission's `ts` gives no sample). Captured at the sender this is the path RTT; at the receiver,
//!   only its ACK delay. At most [`MAX_PENDING_PUSH`] PUSH transmissions per flow wait for their ACK (a
//!   sample of the window when more are in flight); the peer's `una` retires the acknowledged ones.
//! - **wnd**: the receive window the flow's source last advertised; **peer wnd**: the one the other
//!   direction advertised (what limits this flow's sender).
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use crate::proto::guard::{Addressing, Guard, GuardFormat};
use crate::wire::crypt::{BlockMode, CryptError, Crypto};
use crate::wire::envelope::{self, EnvelopeError, Medium, TcpFlags};
use crate::wire::{fec, header, kcp, smux};

/// smux protocol version paqet uses.
const SMUX_VERSION: u8 = 2;
/// Flows (source address, destination address, conv) tracked for smux reassembly and congestion figures
/// before the table is reset.
const MAX_FLOWS: usize = 4096;
/// Sequence numbers below the highest one seen that a flow remembers to tell retransmissions (bits).
pub const SN_HISTORY: u32 = 4096;
/// PUSH transmissions per flow waiting for their ACK (RTT samples).
pub const MAX_PENDING_PUSH: usize = 64;
/// Default summary interval: one second of capture time.
pub const SUMMARY_INTERVAL_MICROS: u64 = 1_000_000;

/// Errors of the live capture.
#[derive(Debug, Error)]
pub enum DumpError {
    /// libpcap could not open or filter the interface.
    #[error("pcap {op} on interface \"{iface}\" failed: {msg}")]
    Pcap {
        iface: String,
        op: &'static str,
        msg: String,
    },
    /// Writing the description failed.
    #[error("cannot write the dump output: {0}")]
    Output(#[from] std::io::Error),
}

/// Where a flow's smux byte stream stands, and its congestion figures.
#[derive(Debug, Clone, Default)]
struct FlowState {
    /// The next in-order KCP `sn` expected on this flow.
    next_sn: u32,
    /// Bytes of a frame (header already seen) still to arrive in later segments.
    skip: usize,
    /// Bytes of a frame header that were cut at the end of the previous segment.
    partial: Vec<u8>,
    cc: FlowCc,
}

/// Counters over an interval of capture time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    /// Segments of any command.
    segments: u64,
    push_segments: u64,
    /// PUSH segments whose `sn` was already seen.
    retrans_segments: u64,
    /// PUSH payload bytes.
    push_bytes: u64,
    rtt_samples: u64,
    rtt_sum_us: u64,
    rtt_min_us: u64,
    rtt_max_us: u64,
}

impl Tally {
    fn add_rtt(&mut self, us: u64) {
        self.rtt_min_us = if self.rtt_samples == 0 {
            us
        } else {
            self.rtt_min_us.min(us)
        };
        self.rtt_max_us = self.rtt_max_us.max(us);
        self.rtt_samples += 1;
        self.rtt_sum_us = self.rtt_sum_us.saturating_add(us);
    }
}

/// Which sequence numbers a flow has seen: the highest, and a bitmap of the [`SN_HISTORY`] below it.
#[derive(Debug, Clone, Default)]
struct SnSet {
    highest: Option<u32>,
    /// Bit `sn % SN_HISTORY`; allocated at the first PUSH.
    bits: Vec<u64>,
}

impl SnSet {
    fn bit(&mut self, sn: u32) -> (&mut u64, u64) {
        let i = (sn % SN_HISTORY) as usize;
        (&mut self.bits[i / 64], 1u64 << (i % 64))
    }

    /// Records `sn`; returns true if it was seen before (or is older than the history).
    fn insert(&mut self, sn: u32) -> bool {
        if self.bits.is_empty() {
            self.bits = vec![0; SN_HISTORY as usize / 64];
        }
        let Some(high) = self.highest else {
            self.highest = Some(sn);
            let (w, m) = self.bit(sn);
            *w |= m;
            return false;
        };
        let ahead = sn.wrapping_sub(high);
        if ahead != 0 && ahead <= u32::MAX / 2 {
            // A new highest sn: forget the bits it moves past.
            if ahead >= SN_HISTORY {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for k in 1..=ahead {
                    let (w, m) = self.bit(high.wrapping_add(k));
                    *w &= !m;
                }
            }
            self.highest = Some(sn);
            let (w, m) = self.bit(sn);
            *w |= m;
            return false;
        }
        if high.wrapping_sub(sn) >= SN_HISTORY {
            return true;
        }
        let (w, m) = self.bit(sn);
        let seen = *w & m != 0;
        *w |= m;
        seen
    }
}

/// Congestion figures of one flow (see the module docs).
#[derive(Debug, Clone, Default)]
struct FlowCc {
    /// Capture times (µs) of the flow's first and last segment.
    first_us: u64,
    last_us: u64,
    /// Over the whole capture.
    total: Tally,
    /// Over the current summary interval.
    interval: Tally,
    /// `wnd` of the last segment this flow's source sent.
    wnd: Option<u16>,
    seen: SnSet,
    /// PUSH transmissions waiting for their ACK: (sn, ts, capture time µs).
    pending: Vec<(u32, u32, u64)>,
}

/// A flow's congestion figures over the whole capture (see [`Dumper::flow_summaries`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSummary {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub conv: u32,
    /// Capture times (µs) of the flow's first and last segment.
    pub first_micros: u64,
    pub last_micros: u64,
    /// Segments of any command.
    pub segments: u64,
    pub push_segments: u64,
    /// PUSH segments whose `sn` was already seen on the flow.
    pub retrans_segments: u64,
    /// PUSH payload bytes (retransmissions included).
    pub push_bytes: u64,
    /// RTT samples at the capture point (PUSH → its ACK), microseconds.
    pub rtt_samples: u64,
    pub rtt_min_micros: u64,
    pub rtt_avg_micros: u64,
    pub rtt_max_micros: u64,
    /// Receive window the flow's source last advertised, segments.
    pub wnd: Option<u16>,
    /// Receive window the reverse direction last advertised, segments.
    pub peer_wnd: Option<u16>,
}

impl FlowSummary {
    /// PUSH payload bytes per second between the flow's first and last segment (None if they coincide).
    pub fn data_rate(&self) -> Option<f64> {
        let span = self
            .last_micros
            .checked_sub(self.first_micros)
            .filter(|d| *d > 0)?;
        Some(self.push_bytes as f64 * 1e6 / span as f64)
    }

    /// Retransmitted PUSH segments / PUSH segments (0 without PUSH).
    pub fn retrans_ratio(&self) -> f64 {
        if self.push_segments == 0 {
            0.0
        } else {
            self.retrans_segments as f64 / self.push_segments as f64
        }
    }
}

/// A stateful frame describer (see the module docs).
pub struct Dumper {
    crypto: Option<Crypto>,
    fec: Option<(usize, usize)>,
    port: u16,
    /// What frames start with (Ethernet, or the IP header on tun/ppp/WireGuard).
    medium: Medium,
    /// The packet guard (`transport.kcp.guard`): checked and stripped before decryption.
    guard: Option<Guard>,
    /// Reused buffer the payload is decrypted in.
    buf: Vec<u8>,
    flows: HashMap<FlowKey, FlowState>,
    /// Summary interval (µs of capture time); None = no periodic summaries.
    summary_every: Option<u64>,
    /// Start of the current summary interval (capture time µs); None before the first frame.
    interval_start: Option<u64>,
    /// Capture time of the latest frame.
    last_ts: u64,
}

/// (source, destination, conv): one direction of one KCP conversation.
type FlowKey = (SocketAddr, SocketAddr, u32);

impl Dumper {
    /// `crypto`: the configured block crypto (`None`: the payload is taken as a plain body, like
    /// `null`). `fec`: `(dshard, pshard)` if FEC is configured (used to name groups and shards; FEC
    /// headers are recognised either way). `port`: the tunnel port (server port or client port), used
    /// to tell the direction.
    pub fn new(crypto: Option<Crypto>, fec: Option<(usize, usize)>, port: u16) -> Self {
        Dumper {
            crypto,
            fec,
            port,
            medium: Medium::Ethernet,
            guard: None,
            buf: Vec::with_capacity(2048),
            flows: HashMap::new(),
            summary_every: Some(SUMMARY_INTERVAL_MICROS),
            interval_start: None,
            last_ts: 0,
        }
    }

    /// Sets the interval of the periodic per-flow summary lines in microseconds of capture time
    /// (default [`SUMMARY_INTERVAL_MICROS`]); `None` or 0 turns them off ([`Dumper::finish`] still
    /// reports the totals).
    pub fn set_summary_interval(&mut self, micros: Option<u64>) {
        self.summary_every = micros.filter(|m| *m > 0);
    }

    /// Sets the packet guard of the configuration (`transport.kcp.guard` on): every payload must start
    /// with its prefix (a tag, or the deprecated cookie), which is checked and stripped before
    /// decryption. Direction for the tag's binding: frames to [`Dumper::port`] go to the server.
    pub fn set_guard(&mut self, guard: Option<Guard>) {
        self.guard = guard;
    }

    /// The tunnel port this dumper was made for.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sets what the frames start with (default Ethernet; [`Medium::Ip`] for captures without a link
    /// header, as [`run_live`] does from the capture's datalink).
    pub fn set_medium(&mut self, medium: Medium) {
        self.medium = medium;
    }

    /// Describes one Ethernet frame captured at `ts_micros` (microseconds since the Unix epoch).
    /// The result ends with a newline.
    /// When the frame starts a new summary interval, the summary lines of the one that ended come first.
    pub fn describe(&mut self, ts_micros: u64, frame: &[u8]) -> String {
        let mut out = String::with_capacity(256);
        self.roll_interval(&mut out, ts_micros);
        write_time(&mut out, ts_micros);
        match envelope::parse_frame_on(self.medium, frame, None) {
            Ok(p) => {
                let dir = self.direction(p.src_port, p.dst_port);
                let _ = writeln!(
                    out,
                    " {} -> {}{dir} | {} bytes | TCP {} | payload {}",
                    p.src_addr(),
                    p.dst_addr(),
                    frame.len(),
                    p.flags,
                    p.payload.len()
                );
                self.describe_payload(&mut out, (p.src_addr(), p.dst_addr(), ts_micros), p.payload);
            }
            Err(EnvelopeError::EmptyPayload) => match peek_tcp(self.medium, frame) {
                Some((src, dst, flags)) => {
                    let dir = self.direction(src.port(), dst.port());
                    let _ = writeln!(
                        out,
                        " {src} -> {dst}{dir} | {} bytes | TCP {flags} | no payload",
                        frame.len()
                    );
                }
                None => {
                    let _ = writeln!(out, " {} bytes | TCP segment without payload", frame.len());
                }
            },
            Err(e) => {
                let _ = writeln!(out, " {} bytes | not a tunnel frame: {e}", frame.len());
                hex_dump(&mut out, frame);
            }
        }
        out
    }

    fn direction(&self, src_port: u16, dst_port: u16) -> &'static str {
        if dst_port == self.port {
            " (to port)"
        } else if src_port == self.port {
            " (from port)"
        } else {
            ""
        }
    }

    /// Crypto check, then FEC, then KCP/smux. `at`: the frame's source, destination and capture time.
    fn describe_payload(
        &mut self,
        out: &mut String,
        at: (SocketAddr, SocketAddr, u64),
        payload: &[u8],
    ) {
        let mut payload = payload;
        if let Some(g) = self.guard.as_mut() {
            let (src, dst, ts) = at;
            let addressing = Addressing {
                src,
                dst,
                to_server: dst.port() == self.port,
            };
            let what = match g.config().format {
                GuardFormat::Tag => "tag",
                GuardFormat::Cookie => "cookie",
            };
            if !g.check(ts / 1_000_000, &addressing, payload) {
                let _ = writeln!(
                    out,
                    "  guard {what}: no valid {what} (another key, guard_format or guard_bind, a rewritten address, or not a tunnel datagram)"
                );
                hex_dump(out, payload);
                return;
            }
            let n = g.prefix_len();
            let _ = writeln!(out, "  guard {what}: ok ({n} bytes)");
            payload = &payload[n..];
        }
        self.buf.clear();
        self.buf.extend_from_slice(payload);
        let body = match &self.crypto {
            None => {
                let _ = writeln!(
                    out,
                    "  crypto: no key configured, payload taken as the body"
                );
                0..self.buf.len()
            }
            Some(c) => match c.open(&mut self.buf) {
                Ok(range) => {
                    let what = match c.mode() {
                        BlockMode::Null => "no integrity check (null)",
                        BlockMode::Aes128Gcm => "tag ok",
                        _ => "crc ok",
                    };
                    let _ = writeln!(
                        out,
                        "  crypto {}: {what}, body {} bytes",
                        c.mode(),
                        range.len()
                    );
                    range
                }
                Err(e) => {
                    let why = match &e {
                        CryptError::CrcMismatch { .. } => "CRC mismatch",
                        CryptError::AuthFailed { .. } => "authentication failed",
                        CryptError::TooShort { .. } => "too short",
                        _ => "error",
                    };
                    let _ = writeln!(
                        out,
                        "  crypto {}: crypto check failed ({why}): {e}",
                        c.mode()
                    );
                    hex_dump(out, payload);
                    return;
                }
            },
        };
        // Move the decrypted body out of `self.buf` for the borrow checker, and put it back after.
        let buf = std::mem::take(&mut self.buf);
        self.describe_body(out, at, &buf[body]);
        self.buf = buf;
    }

    fn describe_body(&mut self, out: &mut String, at: (SocketAddr, SocketAddr, u64), body: &[u8]) {
        let (src, dst, ts) = at;
        let kcp_bytes = if fec::is_fec(body) {
            match fec::parse(body) {
                Ok(p) => {
                    let kind = match p.kind {
                        fec::FecKind::Data => "data",
                        fec::FecKind::Parity => "parity",
                    };
                    let _ = write!(out, "  fec seqid={} {kind}", p.seqid);
                    if let Some((d, par)) = self.fec {
                        let n = (d + par) as u32;
                        if let (Some(g), Some(i)) = (p.seqid.checked_div(n), p.seqid.checked_rem(n))
                        {
                            let _ = write!(out, " (group {g}, shard {i})");
                        }
                    }
                    let _ = writeln!(out, " {} bytes", p.payload.len());
                    if p.kind == fec::FecKind::Parity {
                        return;
                    }
                    p.payload
                }
                Err(e) => {
                    let _ = writeln!(out, "  fec: {e}");
                    hex_dump(out, body);
                    return;
                }
            }
        } else {
            body
        };
        if kcp_bytes.is_empty() {
            let _ = writeln!(out, "  kcp: empty");
            return;
        }
        let mut rest = kcp_bytes;
        // The sender's cumulative ack, applied to the reverse flow once every ACK of the datagram matched.
        let mut una: Option<(u32, u32)> = None;
        while !rest.is_empty() {
            match kcp::SegmentHeader::parse(rest) {
                Ok((h, data, after)) => {
                    let cmd = match h.cmd {
                        kcp::Cmd::Push => "PUSH",
                        kcp::Cmd::Ack => "ACK",
                        kcp::Cmd::Wask => "WASK",
                        kcp::Cmd::Wins => "WINS",
                    };
                    let _ = writeln!(
                        out,
                        "  kcp conv={:08x} {cmd} sn={} una={} wnd={} ts={} frg={} len={}",
                        h.conv, h.sn, h.una, h.wnd, h.ts, h.frg, h.len
                    );
                    self.account(src, dst, ts, &h, data.len());
                    una = Some((h.conv, h.una));
                    if h.cmd == kcp::Cmd::Push && !data.is_empty() {
                        self.describe_push(out, (src, dst, h.conv), h.sn, data);
                    }
                    rest = after;
                }
                Err(e) => {
                    let _ = writeln!(out, "  kcp: {e}");
                    hex_dump(out, rest);
                    break;
                }
            }
        }
        if let Some((conv, una)) = una {
            if let Some(f) = self.flows.get_mut(&(dst, src, conv)) {
                // PUSH transmissions below the peer's una are delivered: no ACK of theirs will be matched.
                f.cc.pending.retain(|&(sn, _, _)| {
                    una.wrapping_sub(sn) == 0 || una.wrapping_sub(sn) > u32::MAX / 2
                });
            }
        }
    }

    /// The flow `key`, created if new (the table is reset when full, as the smux state).
    fn flow(&mut self, key: FlowKey) -> &mut FlowState {
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&key) {
            self.flows.clear();
        }
        self.flows.entry(key).or_default()
    }

    /// Congestion figures of one segment `src` → `dst` captured at `ts` (µs).
    fn account(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        ts: u64,
        h: &kcp::SegmentHeader,
        len: usize,
    ) {
        let f = &mut self.flow((src, dst, h.conv)).cc;
        if f.total.segments == 0 {
            f.first_us = ts;
        }
        f.last_us = f.last_us.max(ts);
        f.wnd = Some(h.wnd);
        f.total.segments += 1;
        f.interval.segments += 1;
        match h.cmd {
            kcp::Cmd::Push => {
                let again = f.seen.insert(h.sn);
                for t in [&mut f.total, &mut f.interval] {
                    t.push_segments += 1;
                    t.push_bytes = t.push_bytes.saturating_add(len as u64);
                    t.retrans_segments += u64::from(again);
                }
                match f.pending.iter().position(|p| p.0 == h.sn) {
                    // The same transmission captured twice: keep the first time.
                    Some(i) if f.pending[i].1 == h.ts => {}
                    // A retransmission with a new ts: its ACK will echo one of them, time the newest.
                    Some(i) => f.pending[i] = (h.sn, h.ts, ts),
                    None if f.pending.len() < MAX_PENDING_PUSH => f.pending.push((h.sn, h.ts, ts)),
                    None => {}
                }
            }
            kcp::Cmd::Ack => {
                let Some(fwd) = self.flows.get_mut(&(dst, src, h.conv)) else {
                    return;
                };
                let c = &mut fwd.cc;
                if let Some(i) = c.pending.iter().position(|p| p.0 == h.sn) {
                    let (_, sent_ts, sent_at) = c.pending.swap_remove(i);
                    // An ACK echoing another transmission's ts (or a capture clock going back) gives no sample.
                    if sent_ts == h.ts {
                        if let Some(rtt) = ts.checked_sub(sent_at) {
                            c.total.add_rtt(rtt);
                            c.interval.add_rtt(rtt);
                        }
                    }
                }
            }
            kcp::Cmd::Wask | kcp::Cmd::Wins => {}
        }
    }

    /// Starts the summary interval containing `ts`; if that ends the current one, writes its summary.
    fn roll_interval(&mut self, out: &mut String, ts: u64) {
        self.last_ts = self.last_ts.max(ts);
        let Some(every) = self.summary_every else {
            return;
        };
        let Some(start) = self.interval_start else {
            self.interval_start = Some(ts);
            return;
        };
        let Some(elapsed) = ts.checked_sub(start).filter(|e| *e >= every) else {
            return;
        };
        let end = start.saturating_add(every);
        self.write_summaries(out, end, every, false);
        self.interval_start = Some(start.saturating_add(elapsed - elapsed % every));
    }

    /// Writes one summary line per flow with segments in the current interval (`totals`: over the whole
    /// capture instead, every flow) stamped `at`, rates over `span_us`; resets the interval counters.
    fn write_summaries(&mut self, out: &mut String, at: u64, span_us: u64, totals: bool) {
        let mut keys: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                if totals {
                    f.cc.total.segments > 0
                } else {
                    f.cc.interval.segments > 0
                }
            })
            .map(|(k, _)| *k)
            .collect();
        keys.sort();
        for key in keys {
            let peer_wnd = self
                .flows
                .get(&(key.1, key.0, key.2))
                .and_then(|f| f.cc.wnd);
            let Some(f) = self.flows.get(&key) else {
                continue;
            };
            let c = &f.cc;
            let (t, span) = if totals {
                (c.total, c.last_us.saturating_sub(c.first_us))
            } else {
                (c.interval, span_us)
            };
            write_time(out, at);
            let what = if totals { "summary total" } else { "summary" };
            let secs = span as f64 / 1e6;
            let _ = write!(
                out,
                " {what} {} -> {} conv={:08x} | {secs:.3} s | data ",
                key.0, key.1, key.2
            );
            if span > 0 {
                let _ = write!(out, "{:.0} B/s", t.push_bytes as f64 * 1e6 / span as f64);
            } else {
                let _ = write!(out, "{} B", t.push_bytes);
            }
            let _ = write!(
                out,
                ", {} segs | retrans {}/{}",
                t.push_segments, t.retrans_segments, t.push_segments
            );
            if t.push_segments > 0 {
                let _ = write!(
                    out,
                    " ({:.1} %)",
                    100.0 * t.retrans_segments as f64 / t.push_segments as f64
                );
            }
            out.push_str(" | rtt ");
            if let Some(avg_us) = t.rtt_sum_us.checked_div(t.rtt_samples) {
                let ms = |us: u64| us as f64 / 1000.0;
                let _ = write!(
                    out,
                    "{:.3} ms (min {:.3}, max {:.3}, {} samples)",
                    ms(avg_us),
                    ms(t.rtt_min_us),
                    ms(t.rtt_max_us),
                    t.rtt_samples
                );
            } else {
                out.push('-');
            }
            match c.wnd {
                Some(w) => {
                    let _ = write!(out, " | wnd {w}");
                }
                None => out.push_str(" | wnd -"),
            }
            if let Some(w) = peer_wnd {
                let _ = write!(out, ", peer wnd {w}");
            }
            out.push('\n');
        }
        for f in self.flows.values_mut() {
            f.cc.interval = Tally::default();
        }
    }

    /// Ends the capture: the summary of the last (partial) interval, then one `summary total` line per
    /// flow over the whole capture (rates between the flow's first and last segment). The periodic
    /// counters restart; the totals go on if more frames follow.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        if let (Some(_), Some(start)) = (self.summary_every, self.interval_start) {
            let span = self.last_ts.saturating_sub(start);
            self.write_summaries(&mut out, self.last_ts, span, false);
            self.interval_start = Some(self.last_ts);
        }
        self.write_summaries(&mut out, self.last_ts, 0, true);
        out
    }

    /// Every flow's figures over the whole capture, sorted by (source, destination, conv).
    pub fn flow_summaries(&self) -> Vec<FlowSummary> {
        let mut v: Vec<FlowSummary> = self
            .flows
            .iter()
            .filter(|(_, f)| f.cc.total.segments > 0)
            .map(|(&(src, dst, conv), f)| {
                let (c, t) = (&f.cc, &f.cc.total);
                FlowSummary {
                    src,
                    dst,
                    conv,
                    first_micros: c.first_us,
                    last_micros: c.last_us,
                    segments: t.segments,
                    push_segments: t.push_segments,
                    retrans_segments: t.retrans_segments,
                    push_bytes: t.push_bytes,
                    rtt_samples: t.rtt_samples,
                    rtt_min_micros: t.rtt_min_us,
                    rtt_avg_micros: t.rtt_sum_us.checked_div(t.rtt_samples).unwrap_or(0),
                    rtt_max_micros: t.rtt_max_us,
                    wnd: c.wnd,
                    peer_wnd: self.flows.get(&(dst, src, conv)).and_then(|r| r.cc.wnd),
                }
            })
            .collect();
        v.sort_by_key(|f| (f.src, f.dst, f.conv));
        v
    }

    /// Lists the smux frames that start inside one PUSH segment's data.
    fn describe_push(&mut self, out: &mut String, key: FlowKey, sn: u32, data: &[u8]) {
        let flow = self.flow(key);
        let in_order = sn == flow.next_sn;
        if !in_order && sn.wrapping_sub(flow.next_sn) > u32::MAX / 2 {
            let _ = writeln!(
                out,
                "    (retransmission: sn {sn} < next expected {})",
                flow.next_sn
            );
            return;
        }
        let mut at = 0usize;
        if in_order {
            // Finish a frame header cut at the end of the previous segment.
            if !flow.partial.is_empty() {
                let need = smux::HEADER_LEN - flow.partial.len();
                if data.len() < need {
                    flow.partial.extend_from_slice(data);
                    flow.next_sn = sn.wrapping_add(1);
                    return;
                }
                let mut hdr = [0u8; smux::HEADER_LEN];
                hdr[..flow.partial.len()].copy_from_slice(&flow.partial);
                hdr[flow.partial.len()..].copy_from_slice(&data[..need]);
                flow.partial.clear();
                at = need;
                match smux::FrameHeader::parse(&hdr, SMUX_VERSION) {
                    Ok(h) => {
                        let _ = writeln!(
                            out,
                            "    smux {:?} sid={} len={} (header began in the previous segment)",
                            h.cmd, h.sid, h.length
                        );
                        flow.skip = h.length as usize;
                    }
                    Err(e) => {
                        let _ = writeln!(out, "    smux: {e}");
                        flow.skip = 0;
                        flow.next_sn = sn.wrapping_add(1);
                        return;
                    }
                }
            }
            let skip = flow.skip.min(data.len() - at);
            if skip > 0 {
                let _ = writeln!(
                    out,
                    "    smux: {skip} bytes continue a frame from an earlier segment"
                );
            }
            at += skip;
            flow.skip -= skip;
        } else {
            let _ = writeln!(
                out,
                "    (out of order: sn {sn}, expected {}; smux decoded from the first byte)",
                flow.next_sn
            );
            flow.skip = 0;
            flow.partial.clear();
        }
        flow.next_sn = sn.wrapping_add(1);
        // Frames starting in this segment.
        while at < data.len() {
            let rest = &data[at..];
            if rest.len() < smux::HEADER_LEN {
                flow.partial.extend_from_slice(rest);
                break;
            }
            let h = match smux::FrameHeader::parse(rest, SMUX_VERSION) {
                Ok(h) => h,
                Err(e) => {
                    let _ = writeln!(out, "    smux: {e}");
                    hex_dump(out, rest);
                    flow.skip = 0;
                    break;
                }
            };
            let body = &rest[smux::HEADER_LEN..];
            let have = body.len().min(h.length as usize);
            let _ = write!(out, "    smux {:?} sid={} len={}", h.cmd, h.sid, h.length);
            match h.cmd {
                smux::Cmd::Upd if have == smux::UPD_LEN => {
                    if let Ok(u) = smux::Upd::parse(body) {
                        let _ = write!(out, " consumed={} window={}", u.consumed, u.window);
                    }
                }
                smux::Cmd::Psh if have > 0 && body[0] == header::MAGIC => {
                    describe_paqet_header(out, &body[..have]);
                }
                _ => {}
            }
            if have < h.length as usize {
                let _ = write!(out, " (continues in the next segment)");
                flow.skip = h.length as usize - have;
            }
            let _ = writeln!(out);
            at += smux::HEADER_LEN + have;
        }
    }
}

/// Appends a decoded paqet per-stream header if the PSH data starts with one.
fn describe_paqet_header(out: &mut String, data: &[u8]) {
    // Not a header (stream payload that happens to start with 'P'), or cut by the segment end: nothing.
    if let Ok(Some((h, _))) = header::Header::parse(data) {
        let _ = match h {
            header::Header::Ping => write!(out, " paqet PPING"),
            header::Header::Pong => write!(out, " paqet PPONG"),
            header::Header::TcpFlags(f) => {
                let list: Vec<String> = f.iter().map(|b| TcpFlags(*b).to_string()).collect();
                write!(out, " paqet PTCPF [{}]", list.join(","))
            }
            header::Header::Tcp { host, port } => write!(out, " paqet PTCP {host}:{port}"),
            header::Header::Udp { host, port } => write!(out, " paqet PUDP {host}:{port}"),
            header::Header::ReverseDeclare(e) => {
                let list: Vec<String> = e
                    .iter()
                    .map(|r| format!("{:?} {}:{}", r.proto, r.host, r.port))
                    .collect();
                write!(out, " paqet-dp PREVD [{}]", list.join(", "))
            }
            header::Header::ReverseAnswer(a) => {
                let list: Vec<String> = a.iter().map(|s| s.byte().to_string()).collect();
                write!(out, " paqet-dp PREVA [{}]", list.join(","))
            }
            header::Header::ReverseConnect { index } => write!(out, " paqet-dp PREVC {index}"),
        };
    }
}

/// `[HH:MM:SS.uuuuuu]` in UTC.
fn write_time(out: &mut String, ts_micros: u64) {
    let secs = ts_micros / 1_000_000;
    let micros = ts_micros % 1_000_000;
    let day = secs % 86_400;
    let _ = write!(
        out,
        "[{:02}:{:02}:{:02}.{micros:06}]",
        day / 3600,
        (day / 60) % 60,
        day % 60
    );
}

/// Hex dump in the classic `offset  16 hex bytes  |ascii|` layout, indented by four spaces.
pub fn hex_dump(out: &mut String, data: &[u8]) {
    for (i, chunk) in data.chunks(16).enumerate() {
        let _ = write!(out, "    {:08x} ", i * 16);
        for j in 0..16 {
            if j == 8 {
                out.push(' ');
            }
            match chunk.get(j) {
                Some(b) => {
                    let _ = write!(out, " {b:02x}");
                }
                None => out.push_str("   "),
            }
        }
        out.push_str("  |");
        for &b in chunk {
            out.push(if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            });
        }
        out.push_str("|\n");
    }
}

/// Addresses and flags of an untagged Ethernet/IPv4|IPv6/TCP frame (or a bare IPv4|IPv6/TCP packet on
/// [`Medium::Ip`]), for segments the envelope parser rejects as empty (kernel ACK/RST/FIN).
fn peek_tcp(medium: Medium, frame: &[u8]) -> Option<(SocketAddr, SocketAddr, TcpFlags)> {
    let ethertype = match medium {
        Medium::Ethernet => u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]),
        Medium::Ip => match *frame.first()? >> 4 {
            4 => envelope::ETHERTYPE_IPV4,
            6 => envelope::ETHERTYPE_IPV6,
            _ => return None,
        },
    };
    let ip = frame.get(medium.link_header_len()..)?;
    let (src, dst, tcp) = match ethertype {
        envelope::ETHERTYPE_IPV4 => {
            let ihl = usize::from(*ip.first()? & 0x0F) * 4;
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                IpAddr::V4(Ipv4Addr::from(s)),
                IpAddr::V4(Ipv4Addr::from(d)),
                ip.get(ihl..)?,
            )
        }
        envelope::ETHERTYPE_IPV6 => {
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                ip.get(40..)?,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let flags = TcpFlags((u16::from(*tcp.get(12)? & 1) << 8) | u16::from(*tcp.get(13)?));
    Some((
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        flags,
    ))
}

/// Captures on `iface` in both directions (BPF `tcp port <port>`), writes one description per frame
/// (and the periodic per-flow summaries) to `out`, then the final summaries ([`Dumper::finish`]), and
/// returns the number of frames described. Stops after `count` frames (if given) or
/// when `stop` becomes true (checked at least every 100 ms).
pub fn run_live(
    iface: &str,
    port: u16,
    dumper: &mut Dumper,
    count: Option<usize>,
    stop: &AtomicBool,
    out: &mut dyn std::io::Write,
) -> Result<usize, DumpError> {
    let err = |op: &'static str| {
        move |e: pcap::Error| DumpError::Pcap {
            iface: iface.to_owned(),
            op,
            msg: e.to_string(),
        }
    };
    let mut cap = pcap::Capture::from_device(iface)
        .map_err(err("create"))?
        .snaplen(65536)
        .promisc(false)
        .immediate_mode(true)
        .timeout(100)
        .open()
        .map_err(err("activate"))?;
    let datalink = crate::io::pcap::datalink_of(iface, &cap).map_err(|e| DumpError::Pcap {
        iface: iface.to_owned(),
        op: "datalink",
        msg: e.to_string(),
    })?;
    dumper.set_medium(datalink.medium());
    let strip = datalink.strip();
    let filter = format!("tcp port {port}");
    cap.filter(&filter, true).map_err(err("filter"))?;
    tracing::info!(iface, filter = %filter, medium = %datalink.medium(), "dump: capturing");
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) && count.is_none_or(|c| n < c) {
        match cap.next_packet() {
            Ok(p) => {
                let ts = p.header.ts;
                let micros = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
                    + u64::try_from(ts.tv_usec).unwrap_or(0);
                let text = dumper.describe(micros, p.data.get(strip..).unwrap_or(&[]));
                out.write_all(text.as_bytes())?;
                out.flush()?;
                n += 1;
            }
            Err(pcap::Error::TimeoutExpired) => continue,
            Err(e) => return Err(err("read")(e)),
        }
    }
    out.write_all(dumper.finish().as_bytes())?;
    out.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_and_hex_format() {
        let mut s = String::new();
        write_time(&mut s, 3_723_000_042);
        assert_eq!(s, "[01:02:03.000042]");
        let mut h = String::new();
        hex_dump(&mut h, b"PAQET\x00\x01");
        assert_eq!(
            h,
            "    00000000  50 41 51 45 54 00 01                              |PAQET..|\n"
        );
    }

    #[test]
    fn ip_medium_frames_are_described_like_ethernet_ones() {
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:9999".parse().unwrap();
        let mut b = envelope::EnvelopeBuilder::new([2; 6], [4; 6], src, dst, 1).unwrap();
        let payload = [0x5Au8; 64];
        let mut eth = vec![0u8; b.header_len(TcpFlags::PSH_ACK) + payload.len()];
        b.clone()
            .emit_with_payload(TcpFlags::PSH_ACK, &payload, &mut eth)
            .unwrap();
        let ip = eth[14..].to_vec();
        let mut de = Dumper::new(None, None, 9999);
        let mut di = Dumper::new(None, None, 9999);
        di.set_medium(Medium::Ip);
        let te = de.describe(0, &eth);
        let ti = di.describe(0, &ip);
        assert!(
            te.contains("10.0.0.1:40000 -> 10.0.0.2:9999 (to port)"),
            "{te}"
        );
        assert_eq!(
            ti.replace(&format!("{} bytes", ip.len()), "N bytes"),
            te.replace(&format!("{} bytes", eth.len()), "N bytes")
        );
        // A bare ACK without payload is still named, from the IP header.
        let mut ack = vec![0u8; b.header_len(TcpFlags::ACK)];
        b.emit(TcpFlags::ACK, 0, &mut ack).unwrap();
        let t = di.describe(0, &ack[14..]);
        assert!(
            t.contains("10.0.0.1:40000 -> 10.0.0.2:9999 (to port)") && t.contains("no payload"),
            "{t}"
        );
        // An Ethernet frame on an IP capture is not a tunnel frame (and does not panic).
        assert!(di.describe(0, &eth).contains("not a tunnel frame"));
    }

    #[test]
    fn garbage_frames_are_described_not_panicked() {
        let mut d = Dumper::new(None, Some((10, 3)), 9999);
        for len in 0..200usize {
            let frame: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let s = d.describe(0, &frame);
            assert!(s.ends_with('\n'));
        }
        d.set_medium(Medium::Ip);
        for len in 0..200usize {
            let mut frame: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            if let Some(b) = frame.first_mut() {
                *b = 0x45; // reach the IPv4 decoder
            }
            assert!(d.describe(0, &frame).ends_with('\n'));
        }
    }
}
