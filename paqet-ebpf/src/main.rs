//! paqet-dp XDP program.
//!
//! Parses Ethernet (with up to two 802.1Q/802.1ad tags) — or nothing on an interface without a link
//! header (`SteerConfig::FLAG_MEDIUM_IP`: the frame starts at the IP header, version nibble 4 or 6) —, IPv4 (any IHL, first fragments only) or
//! IPv6 (fixed header, next header TCP), then TCP. A frame whose destination (address, port)
//! matches [`SteerConfig`] (server side), or whose source (address, port) is the configured peer
//! endpoint, whose destination address matches and whose destination port is one of our session
//! ports listed in `PAQET_PORTS` (client side, `FLAG_SRC_*`), is redirected into
//! the AF_XDP socket of its RX queue (`PAQET_XSKS`, with `XDP_PASS` as the fallback when that
//! queue has no socket). With the guard on, such a frame must start its TCP payload with a valid
//! guard: the 8-byte tag of [`paqet_common::tag`] keyed by `SteerConfig::tag_key` (tag format), or
//! a `magic | cookie` prefix listed in `PAQET_GUARD` (deprecated cookie format). A tunnel frame
//! without a payload (SYN, bare ACK, FIN, RST) or failing the guard never reaches userspace: with
//! `FLAG_PROBE_CLOSED` it is answered here with the RST this host's kernel sends for a closed port
//! (`XDP_TX`, [`answer_v4`], [`answer_v6`]), otherwise dropped. Everything else goes to the kernel
//! (`XDP_PASS`). Counters: [`XdpCounter`].
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_tail,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, XskMap},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use paqet_common::tag::{
    guard_tag, tag_context, TagAddrs, BIND_4TUPLE, BIND_NONE, BIND_PORT, DIR_TO_CLIENT,
    DIR_TO_SERVER, TAG_HEAD_LEN, TAG_LEN,
};
use paqet_common::{
    port_bit, GuardTable, SteerConfig, XdpCounter, GUARD_PREFIX_LEN, MAX_QUEUES, PORT_WORDS,
};

/// Index 0: what to steer. The initial all-zero value steers nothing (disarmed).
#[map(name = "PAQET_CONFIG")]
static PAQET_CONFIG: Array<SteerConfig> = Array::with_max_entries(1, 0);

/// AF_XDP sockets keyed by RX queue index.
#[map(name = "PAQET_XSKS")]
static PAQET_XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

/// Per-CPU counters indexed by [`XdpCounter`].
#[map(name = "PAQET_COUNTERS")]
static PAQET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XdpCounter::COUNT, 0);

/// Index 0: the currently valid guard prefixes (rotated by userspace).
#[map(name = "PAQET_GUARD")]
static PAQET_GUARD: Array<GuardTable> = Array::with_max_entries(1, 0);

/// Bitmap of our local session ports (client side): bit `port % 64` of word `port / 64`.
/// Source-matched frames to a port not set here belong to someone else and pass to the kernel.
#[map(name = "PAQET_PORTS")]
static PAQET_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;

/// What the parser concluded about a frame.
enum Verdict {
    /// Not a tunnel frame (or not parseable as one): hand to the kernel.
    Pass,
    /// Headers truncated or inconsistent: hand to the kernel, count as malformed.
    Malformed,
    /// A tunnel frame.
    Tunnel(Tunnel),
}

/// Where a tunnel frame's headers and payload are (byte offsets from the frame start).
struct Tunnel {
    /// The IP header.
    l3: usize,
    /// The TCP header.
    l4: usize,
    /// The TCP payload.
    payload: usize,
    /// TCP payload bytes by the IP length (Ethernet padding excluded).
    payload_len: usize,
    /// IPv6 (else IPv4).
    v6: bool,
    /// Matched as a frame to the server's port (server side), else from the server (client side).
    to_server: bool,
}

#[inline(always)]
fn bump(c: XdpCounter) {
    if let Some(p) = PAQET_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot of this CPU; XDP programs are not preempted on it.
        unsafe { *p += 1 };
    }
}

/// True when counter `c` of this CPU holds exactly 1: right after its first [`bump`], so a log
/// statement behind it runs once per CPU.
#[inline(always)]
fn first(c: XdpCounter) -> bool {
    PAQET_COUNTERS.get(c as u32).is_some_and(|n| *n == 1)
}

/// Reads a `T` at byte offset `off` of the frame, or `None` past the end.
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above (the verifier checks it too).
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

#[xdp]
pub fn paqet_xdp(ctx: XdpContext) -> u32 {
    bump(XdpCounter::Seen);
    let Some(cfg) = PAQET_CONFIG.get(0) else {
        bump(XdpCounter::Passed);
        return xdp_action::XDP_PASS;
    };
    if !cfg.is_armed() {
        // Disarmed: do not even parse.
        bump(XdpCounter::Passed);
        return xdp_action::XDP_PASS;
    }
    match classify(&ctx, cfg) {
        Verdict::Pass => {
            bump(XdpCounter::Passed);
            xdp_action::XDP_PASS
        }
        Verdict::Malformed => {
            bump(XdpCounter::Malformed);
            bump(XdpCounter::Passed);
            xdp_action::XDP_PASS
        }
        Verdict::Tunnel(t) => {
            if t.payload_len == 0 {
                // SYN, bare ACK, FIN, RST: never a tunnel datagram.
                bump(XdpCounter::Empty);
                return answer_probe(&ctx, cfg, &t);
            }
            if cfg.has(SteerConfig::FLAG_GUARD) {
                let ok = if cfg.has(SteerConfig::FLAG_GUARD_TAG) {
                    tag_ok(&ctx, cfg, &t)
                } else {
                    guard_ok(&ctx, t.payload)
                };
                if !ok {
                    bump(XdpCounter::GuardDropped);
                    return answer_probe(&ctx, cfg, &t);
                }
            }
            // The low bits of flags are the action when the queue has no socket: pass, not abort.
            match PAQET_XSKS.redirect(ctx.rx_queue_index(), xdp_action::XDP_PASS as u64) {
                Ok(action) => {
                    bump(XdpCounter::Steered);
                    action
                }
                Err(action) => {
                    bump(XdpCounter::NoSocket);
                    bump(XdpCounter::Passed);
                    if first(XdpCounter::NoSocket) {
                        // Once per CPU (the counter's first count), never per packet.
                        warn!(
                            &ctx,
                            "tunnel frame on RX queue {} which has no AF_XDP socket: passed to the kernel (more RX queues than workers?)",
                            ctx.rx_queue_index()
                        );
                    }
                    action
                }
            }
        }
    }
}

/// Walks the headers; `None` means "ran off the end of the frame" (malformed).
#[inline(always)]
fn classify(ctx: &XdpContext, cfg: &SteerConfig) -> Verdict {
    match parse(ctx, cfg) {
        Some(v) => v,
        None => Verdict::Malformed,
    }
}

#[inline(always)]
fn parse(ctx: &XdpContext, cfg: &SteerConfig) -> Option<Verdict> {
    let (mut l3, mut ethertype) = if cfg.has(SteerConfig::FLAG_MEDIUM_IP) {
        // No link header: the IP version nibble stands in for the EtherType. Two bytes are read: a
        // one-byte bounds check compiles to `data_end > data`, which the verifier cannot use.
        let version = u16::from_be(load::<u16>(ctx, 0)?) >> 12;
        let ethertype = match version {
            4 => ETH_P_IP,
            6 => ETH_P_IPV6,
            _ => return Some(Verdict::Pass),
        };
        (0, ethertype)
    } else {
        (ETH_HLEN, u16::from_be(load::<u16>(ctx, 12)?))
    };
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner, or QinQ with 0x8100 twice).
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(load::<u16>(ctx, l3 + 2)?);
        l3 += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = u16::from_be(load::<u16>(ctx, l3 + 2)?);
            l3 += 4;
        }
    }
    // Set when the source address is the configured peer's (client-side steering).
    let mut src_ok = false;
    // Bytes after the IP header by the IP header's length field, and the family.
    let ip_payload: usize;
    let mut v6 = false;
    let l4 = if ethertype == ETH_P_IP {
        if !cfg.has(SteerConfig::FLAG_IPV4) {
            return Some(Verdict::Pass);
        }
        let vihl: u8 = load(ctx, l3)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let tot = u16::from_be(load::<u16>(ctx, l3 + 2)?) as usize;
        if tot < ihl {
            return None;
        }
        ip_payload = tot - ihl;
        if load::<u8>(ctx, l3 + 9)? != IPPROTO_TCP {
            return Some(Verdict::Pass);
        }
        // Non-first fragments carry no TCP header.
        let frag = u16::from_be(load::<u16>(ctx, l3 + 6)?);
        if frag & 0x1fff != 0 {
            return Some(Verdict::Pass);
        }
        if cfg.has(SteerConfig::FLAG_IPV4_ADDR) {
            let dst: [u8; 4] = load(ctx, l3 + 16)?;
            if dst != cfg.ipv4 {
                return Some(Verdict::Pass);
            }
        }
        if cfg.has(SteerConfig::FLAG_SRC_IPV4) {
            let src: [u8; 4] = load(ctx, l3 + 12)?;
            src_ok = src == cfg.src_ipv4;
        }
        l3 + ihl
    } else if ethertype == ETH_P_IPV6 {
        if !cfg.has(SteerConfig::FLAG_IPV6) {
            return Some(Verdict::Pass);
        }
        let ver: u8 = load(ctx, l3)?;
        if ver >> 4 != 6 {
            return None;
        }
        ip_payload = u16::from_be(load::<u16>(ctx, l3 + 4)?) as usize;
        v6 = true;
        if load::<u8>(ctx, l3 + 6)? != IPPROTO_TCP {
            return Some(Verdict::Pass);
        }
        // Destination at l3 + 24, source at l3 + 8.
        if cfg.has(SteerConfig::FLAG_IPV6_ADDR) && !ipv6_eq(ctx, l3 + 24, &cfg.ipv6)? {
            return Some(Verdict::Pass);
        }
        if cfg.has(SteerConfig::FLAG_SRC_IPV6) {
            src_ok = ipv6_eq(ctx, l3 + 8, &cfg.src_ipv6)?;
        }
        l3 + IPV6_HLEN
    } else {
        return Some(Verdict::Pass);
    };
    let sport = u16::from_be(load::<u16>(ctx, l4)?);
    let dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
    let doff: u8 = load(ctx, l4 + 12)?;
    let thl = ((doff >> 4) as usize) * 4;
    if thl < TCP_MIN_HLEN {
        return None;
    }
    let to_port = cfg.port != 0 && dport == cfg.port;
    let from_peer = if cfg.has(SteerConfig::FLAG_SRC_ANY) {
        our_port(dport)
    } else {
        src_ok && cfg.src_port != 0 && sport == cfg.src_port && our_port(dport)
    };
    if !to_port && !from_peer {
        return Some(Verdict::Pass);
    }
    // The whole TCP header must be inside the frame, and inside the IP length.
    if ctx.data() + l4 + thl > ctx.data_end() || ip_payload < thl {
        return None;
    }
    Some(Verdict::Tunnel(Tunnel {
        l3,
        l4,
        payload: l4 + thl,
        payload_len: ip_payload - thl,
        v6,
        to_server: to_port,
    }))
}

/// True when `port` is one of our session ports (its bit is set in `PAQET_PORTS`).
#[inline(always)]
fn our_port(port: u16) -> bool {
    let (word, mask) = port_bit(port);
    match PAQET_PORTS.get(word) {
        Some(w) => *w & mask != 0,
        None => false,
    }
}

/// Whether the 16 bytes at `off` equal `want` (`None` past the end of the frame).
#[inline(always)]
fn ipv6_eq(ctx: &XdpContext, off: usize, want: &[u8; 16]) -> Option<bool> {
    let hi: u64 = load(ctx, off)?;
    let lo: u64 = load(ctx, off + 8)?;
    let want_hi = u64::from_ne_bytes([
        want[0], want[1], want[2], want[3], want[4], want[5], want[6], want[7],
    ]);
    let want_lo = u64::from_ne_bytes([
        want[8], want[9], want[10], want[11], want[12], want[13], want[14], want[15],
    ]);
    Some(hi == want_hi && lo == want_lo)
}

/// True when the TCP payload at `payload` starts with a currently valid guard prefix.
#[inline(always)]
fn guard_ok(ctx: &XdpContext, payload: usize) -> bool {
    const _: () = assert!(GUARD_PREFIX_LEN == 12);
    // One bounds check for the whole prefix: with two, LLVM may lay out a path on which only the
    // second one holds, which the verifier cannot rule out and rejects.
    let Some(p) = load::<[u8; GUARD_PREFIX_LEN]>(ctx, payload) else {
        return false;
    };
    let magic = u32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    let cookie = u64::from_ne_bytes([p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]]);
    match PAQET_GUARD.get(0) {
        Some(table) => table.accepts(magic, cookie),
        None => false,
    }
}

/// True when the TCP payload starts with the guard tag of the kcp-go datagram behind it, bound as
/// the config's `FLAG_BIND_*` say (see [`paqet_common::tag`]). A BPF subprogram of its own (not
/// inlined): the SipHash state and the message words would not fit the 512-byte stack together with
/// the caller's.
#[inline(never)]
fn tag_ok(ctx: &XdpContext, cfg: &SteerConfig, t: &Tunnel) -> bool {
    const N: usize = TAG_LEN + TAG_HEAD_LEN;
    if t.payload_len < N {
        return false;
    }
    // One bounds check for tag and head together (see `guard_ok`).
    let Some(p) = load::<[u8; N]>(ctx, t.payload) else {
        return false;
    };
    let got = u64::from_le_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
    let head = [
        p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15], p[16], p[17], p[18], p[19], p[20],
        p[21], p[22], p[23],
    ];
    let dir = if t.to_server {
        DIR_TO_SERVER
    } else {
        DIR_TO_CLIENT
    };
    let Some(ports) = load::<[u8; 4]>(ctx, t.l4) else {
        return false;
    };
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let want = if cfg.has(SteerConfig::FLAG_BIND_4TUPLE) {
        if t.v6 {
            // Source at +8, destination at +24: 32 bytes in one read.
            let Some(a) = load::<[[u8; 16]; 2]>(ctx, t.l3 + 8) else {
                return false;
            };
            let c = tag_context(BIND_4TUPLE, dir, sport, dport, 6);
            guard_tag(&cfg.tag_key, &head, c, TagAddrs::V6(a[0], a[1]))
        } else {
            let Some(a) = load::<[[u8; 4]; 2]>(ctx, t.l3 + 12) else {
                return false;
            };
            let c = tag_context(BIND_4TUPLE, dir, sport, dport, 4);
            guard_tag(&cfg.tag_key, &head, c, TagAddrs::V4(a[0], a[1]))
        }
    } else if cfg.has(SteerConfig::FLAG_BIND_PORT) {
        let port = if t.to_server { dport } else { sport };
        let c = tag_context(BIND_PORT, dir, port, 0, 0);
        guard_tag(&cfg.tag_key, &head, c, TagAddrs::None)
    } else {
        let c = tag_context(BIND_NONE, dir, 0, 0, 0);
        guard_tag(&cfg.tag_key, &head, c, TagAddrs::None)
    };
    got == want
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A tunnel frame that carries no tunnel datagram: with `FLAG_PROBE_CLOSED`, the closed-port answer
/// ([`answer_v4`] / [`answer_v6`]); otherwise (or when none is due, e.g. for an RST) dropped.
#[inline(always)]
fn answer_probe(ctx: &XdpContext, cfg: &SteerConfig, t: &Tunnel) -> u32 {
    if cfg.has(SteerConfig::FLAG_PROBE_CLOSED) {
        let sent = if t.v6 {
            answer_v6(ctx, cfg, t)
        } else {
            answer_v4(ctx, cfg, t)
        };
        if sent.is_some() {
            bump(XdpCounter::ProbeAnswered);
            return xdp_action::XDP_TX;
        }
    }
    xdp_action::XDP_DROP
}

/// Folds a 32-bit one's-complement sum into the 16-bit checksum.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Adds the two big-endian 16-bit words of 4 frame bytes read as a native `u32` to `sum`.
#[inline(always)]
fn add_u32(sum: u32, native: u32) -> u32 {
    let b = u32::from_be(native);
    sum + (b >> 16) + (b & 0xffff)
}

/// The TCP header of the RST Linux's `tcp_v4_send_reset` / `tcp_v6_send_reset` answer for a segment to
/// a port without a socket, as five native words of its bytes (checksum 0): ports swapped, no options,
/// window 0; an incoming ACK gives `RST seq = its ack`, no ACK gives `RST|ACK seq 0, ack = seq + SYN +
/// FIN + payload`. `None` for an incoming RST (never answered). Words, not bytes: twenty byte values
/// would each take a register or a stack slot.
#[inline(always)]
fn rst_header(ctx: &XdpContext, t: &Tunnel) -> Option<[u32; 5]> {
    let ports: u32 = load(ctx, t.l4)?;
    let seq = u32::from_be(load::<u32>(ctx, t.l4 + 4)?);
    let ack: u32 = load(ctx, t.l4 + 8)?;
    let flags = (u16::from_be(load::<u16>(ctx, t.l4 + 12)?) & 0xff) as u8;
    if flags & TCP_RST != 0 {
        return None;
    }
    let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
        (ack, 0u32, TCP_RST)
    } else {
        let mut n = seq.wrapping_add(t.payload_len as u32);
        if flags & TCP_SYN != 0 {
            n = n.wrapping_add(1);
        }
        if flags & TCP_FIN != 0 {
            n = n.wrapping_add(1);
        }
        (0u32, n.to_be(), TCP_RST | TCP_ACK)
    };
    // Swapping the two 16-bit halves of the native word swaps the ports, whatever the host order.
    let swapped = ports.rotate_left(16);
    let off_flags = u32::from_ne_bytes([0x50, rflags, 0, 0]);
    Some([swapped, rseq, rack, off_flags, 0])
}

/// Sum of the words of a TCP header from [`rst_header`].
#[inline(always)]
fn sum_tcp(mut sum: u32, tcp: &[u32; 5]) -> u32 {
    sum = add_u32(sum, tcp[0]);
    sum = add_u32(sum, tcp[1]);
    sum = add_u32(sum, tcp[2]);
    sum = add_u32(sum, tcp[3]);
    add_u32(sum, tcp[4])
}

/// Puts a folded checksum into the low (first in memory) 16 bits of a native word's bytes.
#[inline(always)]
fn with_csum_first(word: u32, c: u16) -> u32 {
    let b = c.to_be_bytes();
    let w = word.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], w[2], w[3]])
}

/// Swaps the Ethernet addresses (VLAN tags, if any, stay); nothing on a medium without a link header.
#[inline(always)]
fn swap_macs(ctx: &XdpContext, cfg: &SteerConfig) -> Option<()> {
    if cfg.has(SteerConfig::FLAG_MEDIUM_IP) {
        return Some(());
    }
    let dst: [u16; 3] = load(ctx, 0)?;
    let src: [u16; 3] = load(ctx, 6)?;
    store(ctx, 0, src)?;
    store(ctx, 6, dst)
}

/// Shrinks the frame to end at `end` (the old end is taken from the IP length, so Ethernet padding of a
/// frame under 60 bytes stays: zeros, which is what the NIC pads the kernel's 54-byte RST with).
#[inline(always)]
fn trim(ctx: &XdpContext, t: &Tunnel, end: usize) -> Option<()> {
    let len = t.payload + t.payload_len;
    if end < len {
        let delta = (end as i64 - len as i64) as i32;
        // SAFETY: the helper only moves data_end within the frame; no pointer into the frame is used
        // after it.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return None;
        }
    }
    Some(())
}

/// Turns an IPv4 frame into the RST this host's kernel sends for a closed port, in place
/// ([`rst_header`]): addresses swapped, no IP options, `tos` reflected without the ECN bits, ID 0 with
/// DF (the kernel's reply socket), TTL = `SteerConfig::ttl` (the host's `ip_default_ttl`). A BPF
/// subprogram of its own (not inlined), like [`tag_ok`], to keep the stack under 512 bytes.
#[inline(never)]
fn answer_v4(ctx: &XdpContext, cfg: &SteerConfig, t: &Tunnel) -> Option<()> {
    let mut tcp = rst_header(ctx, t)?;
    let tos = (u16::from_be(load::<u16>(ctx, t.l3)?) & 0xfc) as u8;
    // Source and destination, read before anything is written.
    let src: u32 = load(ctx, t.l3 + 12)?;
    let dst: u32 = load(ctx, t.l3 + 16)?;
    swap_macs(ctx, cfg)?;
    let w0 = u32::from_ne_bytes([0x45, tos, 0, 40]);
    let w1 = u32::from_ne_bytes([0, 0, 0x40, 0]);
    let w2 = u32::from_ne_bytes([cfg.ttl, IPPROTO_TCP, 0, 0]);
    let mut sum = add_u32(0, w0);
    sum = add_u32(sum, w1);
    sum = add_u32(sum, w2);
    sum = add_u32(sum, src);
    sum = add_u32(sum, dst);
    let w2 = u32::from_ne_bytes({
        let c = fold(sum).to_be_bytes();
        [cfg.ttl, IPPROTO_TCP, c[0], c[1]]
    });
    let mut ps = add_u32(20 + IPPROTO_TCP as u32, src);
    ps = add_u32(ps, dst);
    tcp[4] = with_csum_first(tcp[4], fold(sum_tcp(ps, &tcp)));
    store(ctx, t.l3, [w0, w1, w2, dst, src])?;
    store(ctx, t.l3 + 20, tcp)?;
    trim(ctx, t, t.l3 + 40)
}

/// Turns an IPv6 frame into the RST this host's kernel sends for a closed port, in place
/// ([`rst_header`]): addresses swapped, traffic class reflected without the ECN bits, hop limit =
/// `SteerConfig::hop_limit` (the interface's `hop_limit`). The kernel's flow label is a keyed hash
/// of the flow (`auto_flowlabels`, a per-boot secret); here it is a multiply-rotate mix of the
/// addresses and ports with the tag key, never 0. A BPF subprogram of its own.
#[inline(never)]
fn answer_v6(ctx: &XdpContext, cfg: &SteerConfig, t: &Tunnel) -> Option<()> {
    let mut tcp = rst_header(ctx, t)?;
    let vtc = u16::from_be(load::<u16>(ctx, t.l3)?);
    let tclass = ((vtc >> 4) & 0xfc) as u32;
    let k = &cfg.tag_key;
    let mut x = u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]);
    x ^= tcp[0] as u64;
    swap_macs(ctx, cfg)?;
    // Swap the addresses 4 bytes at a time (source at +8, destination at +24), summing them into the
    // pseudo-header checksum and mixing them into the flow label on the way. Word by word, with the
    // stores in between: unaligned reads are byte loads on BPF, and all 32 bytes live at once would
    // spill past the 512-byte stack.
    let mut ps = 20 + IPPROTO_TCP as u32;
    let mut i = 0;
    while i < 16 {
        let so = t.l3 + 8 + i;
        let sv: u32 = load(ctx, so)?;
        let dv: u32 = load(ctx, so + 16)?;
        ps = add_u32(add_u32(ps, sv), dv);
        x = (x ^ ((sv as u64) << 32 | dv as u64))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
        store(ctx, so, dv)?;
        store(ctx, so + 16, sv)?;
        i += 4;
    }
    x ^= u64::from_le_bytes([k[8], k[9], k[10], k[11], k[12], k[13], k[14], k[15]]);
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    let mut label = (x as u32) & 0x000f_ffff;
    if label == 0 {
        label = 1;
    }
    tcp[4] = with_csum_first(tcp[4], fold(sum_tcp(ps, &tcp)));
    let w0 = (6u32 << 28 | tclass << 20 | label).to_be();
    let w1 = u32::from_ne_bytes([0, 20, IPPROTO_TCP, cfg.hop_limit]);
    store(ctx, t.l3, [w0, w1])?;
    store(ctx, t.l3 + IPV6_HLEN, tcp)?;
    trim(ctx, t, t.l3 + IPV6_HLEN + 20)
}

/// Writes a `T` at byte offset `off` of the frame, or `None` past the end.
#[inline(always)]
fn store<T: Copy>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above (the verifier checks it too).
    unsafe { core::ptr::write_unaligned((start + off) as *mut T, v) };
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
