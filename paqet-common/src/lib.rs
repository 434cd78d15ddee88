//! Types shared by the XDP program (`paqet-ebpf`) and userspace (`paqet-userspace`).
//!
//! Everything here is `#[repr(C)]`/plain data so both sides agree on the layout of map keys and values.
//! The eBPF side builds this crate without features (`no_std`, no allocation); the `user` feature adds
//! userspace-only helpers (still `no_std`).
#![no_std]

pub mod tag;

/// Length of the deprecated cookie-format guard prefix in front of every kcp-go datagram:
/// `magic[4] | cookie[8]` (the tag format's prefix is [`tag::TAG_LEN`] bytes).
pub const GUARD_PREFIX_LEN: usize = 12;
/// Default guard magic.
pub const GUARD_DEFAULT_MAGIC: [u8; 4] = *b"PQT1";

/// Name of the XDP program inside the eBPF object.
pub const PROG_NAME: &str = "paqet_xdp";
/// Name of the `Array<SteerConfig>` map (one entry, index 0).
pub const MAP_CONFIG: &str = "PAQET_CONFIG";
/// Name of the `XskMap` keyed by RX queue index.
pub const MAP_XSKS: &str = "PAQET_XSKS";
/// Name of the `PerCpuArray<u64>` counters map, indexed by [`XdpCounter`].
pub const MAP_COUNTERS: &str = "PAQET_COUNTERS";
/// Name of the `Array<GuardTable>` map (one entry, index 0).
pub const MAP_GUARD: &str = "PAQET_GUARD";
/// Name of the `Array<u64>` bitmap of local session ports ([`PORT_WORDS`] words, bit `port % 64` of
/// word `port / 64`) that client-side (source-matched) steering accepts as destination ports.
pub const MAP_PORTS: &str = "PAQET_PORTS";

/// Number of 64-bit words of the [`MAP_PORTS`] bitmap (one bit per TCP port).
pub const PORT_WORDS: u32 = 65536 / 64;

/// The bitmap word index and bit mask of `port` in the [`MAP_PORTS`] bitmap.
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1u64 << (port & 63))
}

/// Number of entries of the XSKMAP, i.e. the highest RX queue index that can be steered, plus one.
pub const MAX_QUEUES: u32 = 64;

/// Indices of the per-CPU counters kept by the XDP program.
///
/// Every frame the program sees is counted as `Seen` and then as exactly one of `Steered`, `Passed`,
/// `GuardDropped` or `Empty`; `ProbeAnswered` is a subset of the last two. `Malformed` and `NoSocket` are subsets of `Passed`: frames whose headers were
/// truncated or inconsistent, and tunnel frames whose RX queue had no AF_XDP socket.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// Every frame the program ran on.
    Seen = 0,
    /// Tunnel frames redirected into an AF_XDP socket.
    Steered = 1,
    /// Frames handed to the kernel stack (`XDP_PASS`).
    Passed = 2,
    /// Frames whose Ethernet/IP/TCP headers were truncated or invalid (passed to the kernel).
    Malformed = 3,
    /// Tunnel frames dropped because the guard is on and their prefix matched no valid cookie.
    GuardDropped = 4,
    /// Tunnel frames whose RX queue had no AF_XDP socket (passed to the kernel).
    NoSocket = 5,
    /// Frames to the tunnel that carry no tunnel datagram (no payload, or a payload failing the guard)
    /// answered like a closed port (`probe_response = "closed"`: an RST sent with `XDP_TX`). Counted in
    /// `GuardDropped` too when the guard failed.
    ProbeAnswered = 6,
    /// Frames to the tunnel without a payload (SYN, bare ACK, FIN, RST) dropped in the program.
    Empty = 7,
}

impl XdpCounter {
    /// Number of counters (entries of the counters map).
    pub const COUNT: u32 = 8;
    /// All counters, in index order.
    pub const ALL: [XdpCounter; XdpCounter::COUNT as usize] = [
        XdpCounter::Seen,
        XdpCounter::Steered,
        XdpCounter::Passed,
        XdpCounter::Malformed,
        XdpCounter::GuardDropped,
        XdpCounter::NoSocket,
        XdpCounter::ProbeAnswered,
        XdpCounter::Empty,
    ];
    /// Metric-friendly name.
    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::Seen => "seen",
            XdpCounter::Steered => "steered",
            XdpCounter::Passed => "passed",
            XdpCounter::Malformed => "malformed",
            XdpCounter::GuardDropped => "guard_dropped",
            XdpCounter::NoSocket => "no_socket",
            XdpCounter::ProbeAnswered => "probe_answered",
            XdpCounter::Empty => "empty",
        }
    }
}

/// Value of the `PAQET_CONFIG` map: which frames the XDP program steers into AF_XDP.
///
/// A TCP frame is a tunnel frame when its IP family is enabled in `flags`, its destination address
/// matches `ipv4`/`ipv6` if the corresponding `*_ADDR` flag is set (otherwise any address), and
/// either
/// - (server side) its destination port equals `port` (host order; `0` = no destination match), or
/// - (client side) `FLAG_SRC_IPV4`/`FLAG_SRC_IPV6` is set for its family, its source (address,
///   port) is (`src_ipv4`/`src_ipv6`, `src_port`) and its destination port is one of the local
///   session ports listed in the [`MAP_PORTS`] bitmap: frames from the server's endpoint to *our*
///   sessions, not to other clients on the same host (a second client, an upstream paqet client).
///
/// A config that can match nothing (`port == 0` and no `FLAG_SRC_*`) is the "disarmed" state: the
/// program passes everything without parsing ([`SteerConfig::is_armed`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// Tunnel TCP destination port, host byte order; 0 = steer nothing.
    pub port: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Guard magic (the first 4 bytes every valid guard prefix must carry); informational for the
    /// program, which compares whole prefixes from [`GuardTable`].
    pub guard_magic: [u8; 4],
    /// Local IPv4 address (network order) to match when `FLAG_IPV4_ADDR` is set.
    pub ipv4: [u8; 4],
    /// Local IPv6 address (network order) to match when `FLAG_IPV6_ADDR` is set.
    pub ipv6: [u8; 16],
    /// Source TCP port (host order) of the peer endpoint matched by `FLAG_SRC_IPV4`/`FLAG_SRC_IPV6`.
    pub src_port: u16,
    /// Source IPv4 address (network order) matched when `FLAG_SRC_IPV4` is set.
    pub src_ipv4: [u8; 4],
    /// Source IPv6 address (network order) matched when `FLAG_SRC_IPV6` is set.
    pub src_ipv6: [u8; 16],
    /// The 128-bit key of the guard tag (`FLAG_GUARD | FLAG_GUARD_TAG`, see [`tag`]).
    pub tag_key: [u8; 16],
    /// TTL of the answers to probes over IPv4 (the host's `net.ipv4.ip_default_ttl`).
    pub ttl: u8,
    /// Hop limit of the answers to probes over IPv6 (the interface's `net.ipv6.conf.*.hop_limit`).
    pub hop_limit: u8,
}

impl SteerConfig {
    /// Steer IPv4 frames.
    pub const FLAG_IPV4: u16 = 1 << 0;
    /// Steer IPv6 frames.
    pub const FLAG_IPV6: u16 = 1 << 1;
    /// Only IPv4 frames addressed to `ipv4`.
    pub const FLAG_IPV4_ADDR: u16 = 1 << 2;
    /// Only IPv6 frames addressed to `ipv6`.
    pub const FLAG_IPV6_ADDR: u16 = 1 << 3;
    /// Guard on: drop steered frames whose payload prefix matches no valid entry of [`GuardTable`].
    pub const FLAG_GUARD: u16 = 1 << 4;
    /// Client-side steering: IPv4 frames from (`src_ipv4`, `src_port`) to a destination port listed
    /// in the [`MAP_PORTS`] bitmap are tunnel frames (the family must be enabled with `FLAG_IPV4` too).
    pub const FLAG_SRC_IPV4: u16 = 1 << 5;
    /// Client-side steering: IPv6 frames from (`src_ipv6`, `src_port`) to a destination port listed
    /// in the [`MAP_PORTS`] bitmap are tunnel frames (the family must be enabled with `FLAG_IPV6` too).
    pub const FLAG_SRC_IPV6: u16 = 1 << 6;
    /// The interface has no link header (tun, WireGuard under generic XDP): frames start at the
    /// IPv4/IPv6 header, told apart by the version nibble. Without it frames start with Ethernet.
    pub const FLAG_MEDIUM_IP: u16 = 1 << 7;
    /// With `FLAG_GUARD`: the guard is the per-packet tag ([`tag`]) keyed by `tag_key`, not a cookie of
    /// [`GuardTable`].
    pub const FLAG_GUARD_TAG: u16 = 1 << 8;
    /// Tag binding "port" (the server's tunnel port). Neither bind flag = binding "none".
    pub const FLAG_BIND_PORT: u16 = 1 << 9;
    /// Tag binding "4tuple" (source and destination addresses and ports).
    pub const FLAG_BIND_4TUPLE: u16 = 1 << 10;
    /// `probe_response = "closed"`: frames to the tunnel without a tunnel datagram (no payload, or a
    /// payload failing the guard) are answered like a closed port (RST, `XDP_TX`); without it they are
    /// dropped.
    pub const FLAG_PROBE_CLOSED: u16 = 1 << 11;
    /// Client-side steering from several servers: frames of an enabled family to a destination port
    /// listed in the [`MAP_PORTS`] bitmap are tunnel frames whatever their source (the `src_*` fields
    /// are not compared; userspace drops datagrams from anyone but the configured servers).
    pub const FLAG_SRC_ANY: u16 = 1 << 15;

    /// A config steering TCP to `port` on any address of both families, guard off.
    pub const fn any(port: u16) -> Self {
        SteerConfig {
            port,
            flags: Self::FLAG_IPV4 | Self::FLAG_IPV6,
            guard_magic: GUARD_DEFAULT_MAGIC,
            ipv4: [0; 4],
            ipv6: [0; 16],
            src_port: 0,
            src_ipv4: [0; 4],
            src_ipv6: [0; 16],
            tag_key: [0; 16],
            ttl: 64,
            hop_limit: 64,
        }
    }

    /// A client-side config: steer IPv4 TCP frames whose source is the peer endpoint (`ip` in
    /// network order, `port`), to any local address and to the local ports listed in the
    /// [`MAP_PORTS`] bitmap, guard off. No server-side destination-port match (`port` = 0).
    pub const fn from_peer_v4(ip: [u8; 4], port: u16) -> Self {
        SteerConfig {
            port: 0,
            flags: Self::FLAG_IPV4 | Self::FLAG_SRC_IPV4,
            guard_magic: GUARD_DEFAULT_MAGIC,
            ipv4: [0; 4],
            ipv6: [0; 16],
            src_port: port,
            src_ipv4: ip,
            src_ipv6: [0; 16],
            tag_key: [0; 16],
            ttl: 64,
            hop_limit: 64,
        }
    }

    /// Like [`SteerConfig::from_peer_v4`] for an IPv6 peer.
    pub const fn from_peer_v6(ip: [u8; 16], port: u16) -> Self {
        SteerConfig {
            port: 0,
            flags: Self::FLAG_IPV6 | Self::FLAG_SRC_IPV6,
            guard_magic: GUARD_DEFAULT_MAGIC,
            ipv4: [0; 4],
            ipv6: [0; 16],
            src_port: port,
            src_ipv4: [0; 4],
            src_ipv6: ip,
            tag_key: [0; 16],
            ttl: 64,
            hop_limit: 64,
        }
    }

    /// True when the config can match a frame: a destination port is set, or source matching is on
    /// for a family (with a non-zero source port). False = disarmed (the program passes everything).
    #[inline(always)]
    pub const fn is_armed(&self) -> bool {
        self.port != 0
            || (self.src_port != 0 && self.has(Self::FLAG_SRC_IPV4 | Self::FLAG_SRC_IPV6))
            || self.has(Self::FLAG_SRC_ANY)
    }

    /// True when `flag` is set.
    #[inline(always)]
    pub const fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Number of guard prefixes the program can hold (window skew ≤ 10, plus the current and next window,
/// plus room to add new ones before old ones are removed).
pub const GUARD_SLOTS: usize = 16;

/// One accepted guard prefix, split for cheap comparison in the program: `magic` and `cookie` hold
/// the raw prefix bytes reinterpreted in *native* byte order (both sides run on the same host).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardEntry {
    /// Prefix bytes 0..4 (`magic`) as a native-endian `u32`.
    pub magic: u32,
    /// Non-zero when this slot holds a valid prefix.
    pub valid: u32,
    /// Prefix bytes 4..12 (`cookie`) as a native-endian `u64`.
    pub cookie: u64,
}

impl GuardEntry {
    /// The entry for a 12-byte prefix `magic[4] | cookie[8]`.
    pub const fn from_prefix(p: &[u8; GUARD_PREFIX_LEN]) -> Self {
        GuardEntry {
            magic: u32::from_ne_bytes([p[0], p[1], p[2], p[3]]),
            valid: 1,
            cookie: u64::from_ne_bytes([p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]]),
        }
    }

    /// The 12-byte prefix this entry accepts.
    pub const fn prefix(&self) -> [u8; GUARD_PREFIX_LEN] {
        let m = self.magic.to_ne_bytes();
        let c = self.cookie.to_ne_bytes();
        [
            m[0], m[1], m[2], m[3], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
        ]
    }

    /// True when the slot is in use and its prefix equals (`magic`, `cookie`) read natively.
    #[inline(always)]
    pub const fn accepts(&self, magic: u32, cookie: u64) -> bool {
        self.valid != 0 && self.magic == magic && self.cookie == cookie
    }
}

/// Value of the `PAQET_GUARD` map: the currently valid guard prefixes. Userspace rewrites it every
/// guard window, keeping unchanged prefixes in their slots so a concurrent reader never sees a
/// still-valid prefix disappear.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardTable {
    /// Slots; unused ones have `valid == 0`.
    pub entries: [GuardEntry; GUARD_SLOTS],
}

impl GuardTable {
    /// True when any valid slot accepts (`magic`, `cookie`).
    #[inline(always)]
    pub fn accepts(&self, magic: u32, cookie: u64) -> bool {
        let mut i = 0;
        while i < GUARD_SLOTS {
            if self.entries[i].accepts(magic, cookie) {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_stable() {
        // No padding anywhere (userspace hands the bytes to the kernel as they are).
        assert_eq!(core::mem::size_of::<SteerConfig>(), 68);
        assert_eq!(core::mem::align_of::<SteerConfig>(), 2);
        assert_eq!(core::mem::size_of::<GuardEntry>(), 16);
        assert_eq!(core::mem::size_of::<GuardTable>(), 16 * GUARD_SLOTS);
    }

    #[test]
    fn guard_entry_round_trips_and_matches() {
        let p = *b"PQT1abcdefgh";
        let e = GuardEntry::from_prefix(&p);
        assert_eq!(e.prefix(), p);
        let magic = u32::from_ne_bytes(*b"PQT1");
        let cookie = u64::from_ne_bytes(*b"abcdefgh");
        assert!(e.accepts(magic, cookie));
        assert!(!e.accepts(magic, cookie ^ 1));
        let mut t = GuardTable::default();
        assert!(!t.accepts(magic, cookie));
        t.entries[GUARD_SLOTS - 1] = e;
        assert!(t.accepts(magic, cookie));
        t.entries[GUARD_SLOTS - 1].valid = 0;
        assert!(!t.accepts(magic, cookie));
    }

    #[test]
    fn armed_state_needs_a_port_or_a_source_match() {
        assert!(!SteerConfig::default().is_armed());
        assert!(SteerConfig::any(9999).is_armed());
        let c = SteerConfig::from_peer_v4([10, 0, 0, 2], 9999);
        assert!(c.is_armed() && c.port == 0);
        assert!(c.has(SteerConfig::FLAG_IPV4) && c.has(SteerConfig::FLAG_SRC_IPV4));
        assert!(!c.has(SteerConfig::FLAG_SRC_IPV6));
        // A source flag without a source port matches nothing.
        assert!(!SteerConfig::from_peer_v6([0; 16], 0).is_armed());
        let mut d = SteerConfig::any(0);
        d.flags |= SteerConfig::FLAG_SRC_IPV6;
        assert!(!d.is_armed());
        d.src_port = 443;
        assert!(d.is_armed());
        // Several servers: any source to the session ports (no source port needed).
        let mut any_src = SteerConfig::any(0);
        any_src.flags |= SteerConfig::FLAG_SRC_ANY;
        assert!(any_src.is_armed() && any_src.src_port == 0);
        // The medium flag alone arms nothing, and is a bit of its own.
        let mut m = SteerConfig::default();
        m.flags |= SteerConfig::FLAG_MEDIUM_IP;
        assert!(!m.is_armed());
        let all = [
            SteerConfig::FLAG_IPV4,
            SteerConfig::FLAG_IPV6,
            SteerConfig::FLAG_IPV4_ADDR,
            SteerConfig::FLAG_IPV6_ADDR,
            SteerConfig::FLAG_GUARD,
            SteerConfig::FLAG_SRC_IPV4,
            SteerConfig::FLAG_SRC_IPV6,
            SteerConfig::FLAG_GUARD_TAG,
            SteerConfig::FLAG_BIND_PORT,
            SteerConfig::FLAG_BIND_4TUPLE,
            SteerConfig::FLAG_PROBE_CLOSED,
        ];
        assert!(all.iter().all(|f| f & SteerConfig::FLAG_MEDIUM_IP == 0));
        let mut seen = SteerConfig::FLAG_MEDIUM_IP;
        for f in all.into_iter().chain([SteerConfig::FLAG_SRC_ANY]) {
            assert_eq!(f.count_ones(), 1);
            assert_eq!(seen & f, 0, "flag {f:#x} used twice");
            seen |= f;
        }
    }

    #[test]
    fn port_bits_cover_every_port_once() {
        assert_eq!(port_bit(0), (0, 1));
        assert_eq!(port_bit(63), (0, 1 << 63));
        assert_eq!(port_bit(64), (1, 1));
        assert_eq!(port_bit(40001), (625, 1 << 1));
        assert_eq!(port_bit(u16::MAX), (PORT_WORDS - 1, 1 << 63));
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert_eq!(XdpCounter::GuardDropped.name(), "guard_dropped");
    }
}
