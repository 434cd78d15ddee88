//! paqet-dp XDP program.
//!
//! Parses Ethernet (with up to two 802.1Q/802.1ad tags) — or nothing on an interface without a link
//! header (`SteerConfig::FLAG_MEDIUM_IP`: the frame starts at the IP header, version nibble 4 or 6) —, IPv4 (any IHL, first fragments only) or
//! IPv6 (fixed header, next header TCP), then TCP. A frame whose destination (address, port)
//! matches [`SteerConfig`] (server side), or whose source (address, port) is the configured peer
//! endpoint, whose destination address matches and whose destination port is one of our session
//! ports listed in `PAQET_PORTS` (client side, `FLAG_SRC_*`), is redirected into
//! the AF_XDP socket of its RX queue (`PAQET_XSKS`, with `XDP_PASS` as the fallback when that
//! queue has no socket). With the guard on, such a frame must
//! start its TCP payload with a `magic | cookie` prefix listed in `PAQET_GUARD`, otherwise it is
//! dropped here. Everything else goes to the kernel (`XDP_PASS`). Counters: [`XdpCounter`].
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, XskMap},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
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
    /// A tunnel frame whose TCP payload starts at this offset from the frame start.
    Tunnel(usize),
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
        Verdict::Tunnel(payload) => {
            if cfg.has(SteerConfig::FLAG_GUARD) && !guard_ok(&ctx, payload) {
                bump(XdpCounter::GuardDropped);
                return xdp_action::XDP_DROP;
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
    let l4 = if ethertype == ETH_P_IP {
        if !cfg.has(SteerConfig::FLAG_IPV4) {
            return Some(Verdict::Pass);
        }
        let vihl: u8 = load(ctx, l3)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
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
    // The whole TCP header must be inside the frame.
    if ctx.data() + l4 + thl > ctx.data_end() {
        return None;
    }
    Some(Verdict::Tunnel(l4 + thl))
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
