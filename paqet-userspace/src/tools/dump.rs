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
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use crate::wire::crypt::{BlockMode, CryptError, Crypto};
use crate::wire::envelope::{self, EnvelopeError, TcpFlags};
use crate::wire::{fec, header, kcp, smux};

/// smux protocol version paqet uses.
const SMUX_VERSION: u8 = 2;
/// Flows (source address, conv) tracked for smux reassembly before the table is reset.
const MAX_FLOWS: usize = 4096;

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

/// Where a flow's smux byte stream stands.
#[derive(Debug, Clone, Default)]
struct FlowState {
    /// The next in-order KCP `sn` expected on this flow.
    next_sn: u32,
    /// Bytes of a frame (header already seen) still to arrive in later segments.
    skip: usize,
    /// Bytes of a frame header that were cut at the end of the previous segment.
    partial: Vec<u8>,
}

/// A stateful frame describer (see the module docs).
pub struct Dumper {
    crypto: Option<Crypto>,
    fec: Option<(usize, usize)>,
    port: u16,
    /// Reused buffer the payload is decrypted in.
    buf: Vec<u8>,
    flows: HashMap<(SocketAddr, u32), FlowState>,
}

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
            buf: Vec::with_capacity(2048),
            flows: HashMap::new(),
        }
    }

    /// The tunnel port this dumper was made for.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Describes one Ethernet frame captured at `ts_micros` (microseconds since the Unix epoch).
    /// The result ends with a newline.
    pub fn describe(&mut self, ts_micros: u64, frame: &[u8]) -> String {
        let mut out = String::with_capacity(256);
        write_time(&mut out, ts_micros);
        match envelope::parse_frame(frame, None) {
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
                self.describe_payload(&mut out, p.src_addr(), p.payload);
            }
            Err(EnvelopeError::EmptyPayload) => match peek_tcp(frame) {
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

    /// Crypto check, then FEC, then KCP/smux.
    fn describe_payload(&mut self, out: &mut String, src: SocketAddr, payload: &[u8]) {
        self.buf.clear();
        self.buf.extend_from_slice(payload);
        let body = match &self.crypto {
            None => {
                let _ = writeln!(out, "  crypto: no key configured, payload taken as the body");
                0..self.buf.len()
            }
            Some(c) => match c.open(&mut self.buf) {
                Ok(range) => {
                    let what = match c.mode() {
                        BlockMode::Null => "no integrity check (null)",
                        BlockMode::Aes128Gcm => "tag ok",
                        _ => "crc ok",
                    };
                    let _ = writeln!(out, "  crypto {}: {what}, body {} bytes", c.mode(), range.len());
                    range
                }
                Err(e) => {
                    let why = match &e {
                        CryptError::CrcMismatch { .. } => "CRC mismatch",
                        CryptError::AuthFailed { .. } => "authentication failed",
                        CryptError::TooShort { .. } => "too short",
                        _ => "error",
                    };
                    let _ = writeln!(out, "  crypto {}: crypto check failed ({why}): {e}", c.mode());
                    hex_dump(out, payload);
                    return;
                }
            },
        };
        // Move the decrypted body out of `self.buf` for the borrow checker, and put it back after.
        let buf = std::mem::take(&mut self.buf);
        self.describe_body(out, src, &buf[body]);
        self.buf = buf;
    }

    fn describe_body(&mut self, out: &mut String, src: SocketAddr, body: &[u8]) {
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
                        if let (Some(g), Some(i)) = (p.seqid.checked_div(n), p.seqid.checked_rem(n)) {
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
                    if h.cmd == kcp::Cmd::Push && !data.is_empty() {
                        self.describe_push(out, src, h.conv, h.sn, data);
                    }
                    rest = after;
                }
                Err(e) => {
                    let _ = writeln!(out, "  kcp: {e}");
                    hex_dump(out, rest);
                    return;
                }
            }
        }
    }

    /// Lists the smux frames that start inside one PUSH segment's data.
    fn describe_push(&mut self, out: &mut String, src: SocketAddr, conv: u32, sn: u32, data: &[u8]) {
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&(src, conv)) {
            self.flows.clear();
        }
        let flow = self.flows.entry((src, conv)).or_default();
        let in_order = sn == flow.next_sn;
        if !in_order && sn.wrapping_sub(flow.next_sn) > u32::MAX / 2 {
            let _ = writeln!(out, "    (retransmission: sn {sn} < next expected {})", flow.next_sn);
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
                let _ = writeln!(out, "    smux: {skip} bytes continue a frame from an earlier segment");
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
            out.push(if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' });
        }
        out.push_str("|\n");
    }
}

/// Addresses and flags of an untagged Ethernet/IPv4|IPv6/TCP frame, for segments the envelope parser
/// rejects as empty (kernel ACK/RST/FIN).
fn peek_tcp(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, TcpFlags)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(envelope::ETHERNET_HEADER_LEN..)?;
    let (src, dst, tcp) = match ethertype {
        envelope::ETHERTYPE_IPV4 => {
            let ihl = usize::from(*ip.first()? & 0x0F) * 4;
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(d)), ip.get(ihl..)?)
        }
        envelope::ETHERTYPE_IPV6 => {
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)), ip.get(40..)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let flags = TcpFlags((u16::from(*tcp.get(12)? & 1) << 8) | u16::from(*tcp.get(13)?));
    Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport), flags))
}

/// Captures on `iface` in both directions (BPF `tcp port <port>`), writes one description per frame
/// to `out`, and returns the number of frames described. Stops after `count` frames (if given) or
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
    let filter = format!("tcp port {port}");
    cap.filter(&filter, true).map_err(err("filter"))?;
    tracing::info!(iface, filter = %filter, "dump: capturing");
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) && count.is_none_or(|c| n < c) {
        match cap.next_packet() {
            Ok(p) => {
                let ts = p.header.ts;
                let micros = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(ts.tv_usec).unwrap_or(0);
                let text = dumper.describe(micros, p.data);
                out.write_all(text.as_bytes())?;
                out.flush()?;
                n += 1;
            }
            Err(pcap::Error::TimeoutExpired) => continue,
            Err(e) => return Err(err("read")(e)),
        }
    }
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
        assert_eq!(h, "    00000000  50 41 51 45 54 00 01                              |PAQET..|\n");
    }

    #[test]
    fn garbage_frames_are_described_not_panicked() {
        let mut d = Dumper::new(None, Some((10, 3)), 9999);
        for len in 0..200usize {
            let frame: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let s = d.describe(0, &frame);
            assert!(s.ends_with('\n'));
        }
    }
}
