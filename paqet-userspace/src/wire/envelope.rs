//! The Ethernet / IP / TCP envelope around every paqet datagram (spec §3.1, §3.2).
//!
//! - [`Medium`]: what a frame starts with on the interface it travels on, as smoltcp's `phy::Medium`:
//!   an Ethernet II header ([`Medium::Ethernet`], the default: every byte exactly upstream's) or directly
//!   the IPv4/IPv6 header ([`Medium::Ip`]: tun, ppp, WireGuard; no link header, no MACs).
//! - [`parse_frame`] decodes an Ethernet II frame (optionally 802.1Q / 802.1ad tagged) carrying IPv4 or IPv6
//!   and a TCP header, and hands back the addresses, ports, flags and the TCP payload (one kcp-go datagram).
//!   Like upstream's receiver it checks structure only: no L4 checksum (veth offload leaves it partial), no
//!   seq/ack/flag checks. Untrusted bytes never panic; every rejection is a distinct [`EnvelopeError`].
//!   [`parse_frame_on`] does the same for a frame of any [`Medium`].
//! - [`EnvelopeBuilder`] writes the headers exactly as upstream's `send_handle.go` does (TOS 184, DF, TTL 64,
//!   window 65535, synthetic seq/ack/timestamps derived from a per-socket `time` and `counter`), in place in
//!   front of a payload that is already in the output buffer, with both checksums computed; on
//!   [`Medium::Ip`] the same bytes without the Ethernet header ([`EnvelopeBuilder::with_medium`]).
//! - [`TcpFlags`] / [`FlagCycler`]: the flag letters of `local_flag` / `remote_flag` and the PTCPF bitmask.
//! - [`ones_complement_sum`] and friends: the Internet checksum, summed 32 bits at a time.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::{BitOr, BitOrAssign};
use std::sync::atomic::{AtomicUsize, Ordering};

use thiserror::Error;

/// Length of an untagged Ethernet II header.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Length of one 802.1Q / 802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Length of an IPv4 header without options (the only kind paqet sends).
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// TCP header length of a non-SYN paqet packet: 20 + 12 bytes of NOP, NOP, timestamps.
pub const TCP_HEADER_LEN: usize = 32;
/// TCP header length of a SYN paqet packet: 20 + 20 bytes of MSS, SACK-permitted, timestamps, NOP, WS.
pub const TCP_SYN_HEADER_LEN: usize = 40;
/// The longest header [`EnvelopeBuilder`] writes (IPv6 + SYN).
pub const MAX_HEADER_LEN: usize = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + TCP_SYN_HEADER_LEN;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// EtherType of an 802.1Q (customer) VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad (service, "QinQ" outer) VLAN tag.
pub const ETHERTYPE_QINQ: u16 = 0x88A8;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;

/// IPv4 TOS / IPv6 traffic class upstream puts on every packet (DSCP 46, EF).
const TOS: u8 = 184;
/// IPv4 TTL / IPv6 hop limit upstream puts on every packet.
const TTL: u8 = 64;
/// At most this many VLAN tags are accepted in front of the IP header.
const MAX_VLAN_TAGS: usize = 2;

// ------------------------------------------------------------------------------------------------------------
// Medium
// ------------------------------------------------------------------------------------------------------------

/// What a frame starts with on its interface (smoltcp's `phy::Medium`).
///
/// Chosen from the interface, never configured: its ARPHRD type ([`Medium::from_arphrd`]) and, in pcap
/// mode, the capture's datalink type. The default, [`Medium::Ethernet`], keeps every byte exactly
/// upstream's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Medium {
    /// Ethernet II header (optionally VLAN-tagged on receive), then IPv4/IPv6.
    #[default]
    Ethernet,
    /// No link header: frames start at the IPv4/IPv6 header (tun, ppp, WireGuard, ipip/gre/sit).
    Ip,
}

/// ARPHRD_ETHER (`/sys/class/net/<if>/type` = 1): Ethernet, veth, bridges, VLANs, bonds.
pub const ARPHRD_ETHER: u16 = 1;
/// ARPHRD_PPP (512): PPP and PPPoE sessions.
pub const ARPHRD_PPP: u16 = 512;
/// ARPHRD_RAWIP (519): raw IP (e.g. cellular modems).
pub const ARPHRD_RAWIP: u16 = 519;
/// ARPHRD_TUNNEL (768): ipip.
pub const ARPHRD_TUNNEL: u16 = 768;
/// ARPHRD_TUNNEL6 (769): ip6tnl.
pub const ARPHRD_TUNNEL6: u16 = 769;
/// ARPHRD_LOOPBACK (772): `lo` (frames carry an all-zero Ethernet header).
pub const ARPHRD_LOOPBACK: u16 = 772;
/// ARPHRD_SIT (776): IPv6-in-IPv4.
pub const ARPHRD_SIT: u16 = 776;
/// ARPHRD_IPGRE (778): GRE over IP (layer 3).
pub const ARPHRD_IPGRE: u16 = 778;
/// ARPHRD_NONE (65534): tun (`IFF_TUN`), WireGuard.
pub const ARPHRD_NONE: u16 = 65534;

impl Medium {
    /// Bytes of link header in front of the IP header of an untagged frame (14 or 0).
    #[inline]
    pub const fn link_header_len(self) -> usize {
        match self {
            Medium::Ethernet => ETHERNET_HEADER_LEN,
            Medium::Ip => 0,
        }
    }

    /// The medium of an interface of ARPHRD type `arphrd`, or `None` when paqet cannot run on it.
    pub const fn from_arphrd(arphrd: u16) -> Option<Medium> {
        match arphrd {
            ARPHRD_ETHER | ARPHRD_LOOPBACK => Some(Medium::Ethernet),
            ARPHRD_NONE | ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6
            | ARPHRD_SIT | ARPHRD_IPGRE => Some(Medium::Ip),
            _ => None,
        }
    }

    /// A short name of an ARPHRD type for messages (`"ether"`, `"none"`, `"ppp"`, ...; `"unknown"`).
    pub const fn arphrd_name(arphrd: u16) -> &'static str {
        match arphrd {
            ARPHRD_ETHER => "ether",
            ARPHRD_PPP => "ppp",
            ARPHRD_RAWIP => "rawip",
            ARPHRD_TUNNEL => "tunnel (ipip)",
            ARPHRD_TUNNEL6 => "tunnel6",
            ARPHRD_LOOPBACK => "loopback",
            ARPHRD_SIT => "sit",
            ARPHRD_IPGRE => "ipgre",
            ARPHRD_NONE => "none (tun, wireguard)",
            _ => "unknown",
        }
    }

    /// `"ethernet"` or `"ip"` (logs, metrics, `doctor`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Medium::Ethernet => "ethernet",
            Medium::Ip => "ip",
        }
    }

    /// True when frames carry MAC addresses (a `router_mac` is needed).
    #[inline]
    pub const fn has_link_addresses(self) -> bool {
        matches!(self, Medium::Ethernet)
    }
}

impl fmt::Display for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ------------------------------------------------------------------------------------------------------------
// TCP flags
// ------------------------------------------------------------------------------------------------------------

/// TCP flags as a 9-bit mask: the 8 flag bits of byte 13 plus NS (bit 8, the low bit of the reserved nibble
/// in byte 12). This is also the `u16` bitmask carried by PTCPF messages.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u16);

/// The flag letters of upstream's `local_flag` / `remote_flag` strings, in display order.
const FLAG_LETTERS: [(char, TcpFlags); 9] = [
    ('F', TcpFlags::FIN),
    ('S', TcpFlags::SYN),
    ('R', TcpFlags::RST),
    ('P', TcpFlags::PSH),
    ('A', TcpFlags::ACK),
    ('U', TcpFlags::URG),
    ('E', TcpFlags::ECE),
    ('C', TcpFlags::CWR),
    ('N', TcpFlags::NS),
];

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x001);
    pub const SYN: TcpFlags = TcpFlags(0x002);
    pub const RST: TcpFlags = TcpFlags(0x004);
    pub const PSH: TcpFlags = TcpFlags(0x008);
    pub const ACK: TcpFlags = TcpFlags(0x010);
    pub const URG: TcpFlags = TcpFlags(0x020);
    pub const ECE: TcpFlags = TcpFlags(0x040);
    pub const CWR: TcpFlags = TcpFlags(0x080);
    pub const NS: TcpFlags = TcpFlags(0x100);
    /// Every bit that has a meaning on the wire.
    pub const ALL: TcpFlags = TcpFlags(0x1FF);
    /// PSH|ACK, upstream's default `["PA"]`.
    pub const PSH_ACK: TcpFlags = TcpFlags(0x018);

    /// The raw bitmask.
    #[inline]
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// True when every bit of `other` is set in `self`.
    #[inline]
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Parses an upstream flag string such as `"PA"`: letters `F S R P A U E C N` (upper case, as upstream),
    /// in any order, repeats allowed. The empty string is rejected (it would send flag-less segments).
    pub fn from_letters(s: &str) -> Result<Self, FlagError> {
        if s.is_empty() {
            return Err(FlagError::Empty);
        }
        let mut bits = 0u16;
        for (position, letter) in s.chars().enumerate() {
            match FLAG_LETTERS.iter().find(|(l, _)| *l == letter) {
                Some((_, f)) => bits |= f.0,
                None => {
                    return Err(FlagError::BadLetter {
                        letter,
                        position,
                        input: s.to_owned(),
                    });
                }
            }
        }
        Ok(TcpFlags(bits))
    }

    /// The letters of the set flags in the order `F S R P A U E C N` (bits above NS are not shown).
    pub fn to_letters(self) -> String {
        FLAG_LETTERS
            .iter()
            .filter(|(_, f)| self.contains(*f))
            .map(|(l, _)| *l)
            .collect()
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    #[inline]
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for TcpFlags {
    #[inline]
    fn bitor_assign(&mut self, rhs: TcpFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for TcpFlags {
    /// Letters (`PA`); `-` when no flag is set; unknown high bits are appended as `+0x…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known = self.0 & TcpFlags::ALL.0;
        if known == 0 {
            f.write_str("-")?;
        } else {
            for (l, flag) in FLAG_LETTERS.iter() {
                if self.contains(*flag) {
                    fmt::Write::write_char(f, *l)?;
                }
            }
        }
        let unknown = self.0 & !TcpFlags::ALL.0;
        if unknown != 0 {
            write!(f, "+{unknown:#x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TcpFlags({self} = {:#05x})", self.0)
    }
}

/// Errors of flag strings and flag lists (configuration, not per packet).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FlagError {
    #[error("empty TCP flag combination (use letters F S R P A U E C N)")]
    Empty,
    #[error("invalid TCP flag letter {letter:?} at position {position} of {input:?} (valid: F S R P A U E C N)")]
    BadLetter {
        letter: char,
        position: usize,
        input: String,
    },
    #[error("TCP flag list has {0} entries; 1..=64 are allowed")]
    ListLength(usize),
    #[error("TCP flag list entry {index}: {source}")]
    Entry {
        index: usize,
        #[source]
        source: Box<FlagError>,
    },
}

/// A list of flag combinations handed out round-robin, one atomic index per list (upstream's
/// `iterator.Iterator`). Like upstream, the index is incremented *before* use, so the first call returns
/// entry `1 % len` (entry 0 for a one-element list).
#[derive(Debug)]
pub struct FlagCycler {
    flags: Box<[TcpFlags]>,
    index: AtomicUsize,
}

impl FlagCycler {
    /// Most entries a flag list (or a PTCPF message) may hold.
    pub const MAX_ENTRIES: usize = 64;

    /// A cycler over `flags` (1..=64 entries).
    pub fn new(flags: Vec<TcpFlags>) -> Result<Self, FlagError> {
        if flags.is_empty() || flags.len() > Self::MAX_ENTRIES {
            return Err(FlagError::ListLength(flags.len()));
        }
        Ok(FlagCycler {
            flags: flags.into_boxed_slice(),
            index: AtomicUsize::new(0),
        })
    }

    /// A cycler over upstream flag strings such as `["PA", "A"]`.
    pub fn from_letters<S: AsRef<str>>(list: &[S]) -> Result<Self, FlagError> {
        if list.is_empty() || list.len() > Self::MAX_ENTRIES {
            return Err(FlagError::ListLength(list.len()));
        }
        let flags = list
            .iter()
            .enumerate()
            .map(|(index, s)| {
                TcpFlags::from_letters(s.as_ref()).map_err(|e| FlagError::Entry {
                    index,
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(flags)
    }

    /// The next flag combination (thread-safe, lock-free).
    #[inline]
    pub fn next(&self) -> TcpFlags {
        let i = self.index.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        self.flags[i % self.flags.len()]
    }

    /// The list, in configuration order.
    pub fn flags(&self) -> &[TcpFlags] {
        &self.flags
    }
}

impl Clone for FlagCycler {
    fn clone(&self) -> Self {
        FlagCycler {
            flags: self.flags.clone(),
            index: AtomicUsize::new(self.index.load(Ordering::Relaxed)),
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------------------

/// Why a frame was rejected (parse) or could not be built (emit). Every variant has its own
/// [`reason`](EnvelopeError::reason) label so callers can count drops per cause.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("frame of {len} bytes is shorter than an Ethernet header (14)")]
    TruncatedEthernet { len: usize },
    #[error("VLAN tag at offset {offset} runs past the end of the {len}-byte frame")]
    TruncatedVlan { offset: usize, len: usize },
    #[error("more than {MAX_VLAN_TAGS} stacked VLAN tags")]
    TooManyVlanTags,
    #[error("unsupported EtherType {0:#06x} (want IPv4 0x0800 or IPv6 0x86dd)")]
    UnsupportedEtherType(u16),
    #[error("empty packet on an IP (no link header) medium")]
    EmptyIpPacket,
    #[error("IP version {0} on an IP (no link header) medium (want 4 or 6)")]
    UnsupportedIpVersion(u8),
    #[error("IP version {found} in a frame whose EtherType says IPv{expected}")]
    IpVersionMismatch { expected: u8, found: u8 },
    #[error("IPv4 header truncated: {len} bytes left, need 20")]
    TruncatedIpv4 { len: usize },
    #[error("IPv4 IHL {ihl} (< 5 words)")]
    BadIpv4HeaderLen { ihl: u8 },
    #[error("IPv4 total length {total_len} inconsistent with header length {header_len} and {available} bytes present")]
    Ipv4LengthMismatch {
        total_len: usize,
        header_len: usize,
        available: usize,
    },
    #[error("IPv4 fragment (offset {offset}, more-fragments {more}) rejected")]
    Fragmented { offset: u16, more: bool },
    #[error("IPv6 header truncated: {len} bytes left, need 40")]
    TruncatedIpv6 { len: usize },
    #[error("IPv6 payload length {payload_len} exceeds the {available} bytes present")]
    Ipv6LengthMismatch {
        payload_len: usize,
        available: usize,
    },
    #[error("IPv6 extension header {0} (not supported, as upstream)")]
    Ipv6ExtensionHeader(u8),
    #[error("IP protocol {0} is not TCP")]
    NotTcp(u8),
    #[error("TCP header truncated: {len} bytes of IP payload, need 20")]
    TruncatedTcp { len: usize },
    #[error("TCP data offset {data_offset} words invalid for a {available}-byte segment")]
    BadTcpDataOffset { data_offset: u8, available: usize },
    #[error("TCP destination port {found}, want {want}")]
    WrongPort { want: u16, found: u16 },
    #[error("TCP segment carries no payload")]
    EmptyPayload,
    #[error("output buffer of {have} bytes too small for a {need}-byte frame")]
    BufferTooSmall { need: usize, have: usize },
    #[error("payload of {len} bytes too large for one IP packet (max {max})")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("source {src} and destination {dst} are of different address families")]
    MixedAddressFamilies { src: IpAddr, dst: IpAddr },
}

impl EnvelopeError {
    /// A short, stable label for metrics (`snake_case`, one per variant).
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::TruncatedEthernet { .. } => "truncated_ethernet",
            EnvelopeError::TruncatedVlan { .. } => "truncated_vlan",
            EnvelopeError::TooManyVlanTags => "too_many_vlan_tags",
            EnvelopeError::UnsupportedEtherType(_) => "unsupported_ethertype",
            EnvelopeError::EmptyIpPacket => "empty_ip_packet",
            EnvelopeError::UnsupportedIpVersion(_) => "unsupported_ip_version",
            EnvelopeError::IpVersionMismatch { .. } => "ip_version_mismatch",
            EnvelopeError::TruncatedIpv4 { .. } => "truncated_ipv4",
            EnvelopeError::BadIpv4HeaderLen { .. } => "bad_ipv4_header_len",
            EnvelopeError::Ipv4LengthMismatch { .. } => "ipv4_length_mismatch",
            EnvelopeError::Fragmented { .. } => "fragmented",
            EnvelopeError::TruncatedIpv6 { .. } => "truncated_ipv6",
            EnvelopeError::Ipv6LengthMismatch { .. } => "ipv6_length_mismatch",
            EnvelopeError::Ipv6ExtensionHeader(_) => "ipv6_extension_header",
            EnvelopeError::NotTcp(_) => "not_tcp",
            EnvelopeError::TruncatedTcp { .. } => "truncated_tcp",
            EnvelopeError::BadTcpDataOffset { .. } => "bad_tcp_data_offset",
            EnvelopeError::WrongPort { .. } => "wrong_port",
            EnvelopeError::EmptyPayload => "empty_payload",
            EnvelopeError::BufferTooSmall { .. } => "buffer_too_small",
            EnvelopeError::PayloadTooLarge { .. } => "payload_too_large",
            EnvelopeError::MixedAddressFamilies { .. } => "mixed_address_families",
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Parse
// ------------------------------------------------------------------------------------------------------------

/// What the receive path needs from one frame. `payload` borrows the TCP payload from the frame.
/// On [`Medium::Ip`] the MACs are all-zero and `vlan` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// VLAN ID (12 bits) of the outermost tag, if the frame was tagged.
    pub vlan: Option<u16>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: TcpFlags,
    pub payload: &'a [u8],
}

impl Parsed<'_> {
    /// The sender's address: upstream keys peers by (IP source, TCP source port).
    #[inline]
    pub fn src_addr(&self) -> SocketAddr {
        SocketAddr::new(self.src_ip, self.src_port)
    }

    /// The destination address (IP destination, TCP destination port).
    #[inline]
    pub fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(self.dst_ip, self.dst_port)
    }
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn mac(b: &[u8]) -> [u8; 6] {
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// Decodes one Ethernet II frame down to the TCP payload.
///
/// Accepts up to two VLAN tags (0x8100, or an 0x88a8 outer tag), IPv4 without fragmentation (options are
/// skipped; Ethernet padding past the IPv4 total length is trimmed) and IPv6 without extension headers
/// (bytes past the IPv6 payload length are trimmed). If `want_dst_port` is set, another destination port is
/// [`EnvelopeError::WrongPort`]. A segment without payload is [`EnvelopeError::EmptyPayload`].
/// Checksums, seq/ack and flags are not checked (spec §3.2).
pub fn parse_frame(frame: &[u8], want_dst_port: Option<u16>) -> Result<Parsed<'_>, EnvelopeError> {
    parse_frame_on(Medium::Ethernet, frame, want_dst_port)
}

/// [`parse_frame`] for a frame of `medium`: on [`Medium::Ip`] the frame starts at the IPv4/IPv6 header
/// (told apart by the version nibble); the IP/TCP checks are the same.
#[inline]
pub fn parse_frame_on(
    medium: Medium,
    frame: &[u8],
    want_dst_port: Option<u16>,
) -> Result<Parsed<'_>, EnvelopeError> {
    match medium {
        Medium::Ethernet => parse_ethernet(frame, want_dst_port),
        Medium::Ip => {
            let Some(&first) = frame.first() else {
                return Err(EnvelopeError::EmptyIpPacket);
            };
            let (src_ip, dst_ip, segment) = match first >> 4 {
                4 => parse_ipv4(frame)?,
                6 => parse_ipv6(frame)?,
                v => return Err(EnvelopeError::UnsupportedIpVersion(v)),
            };
            parse_tcp([0; 6], [0; 6], None, src_ip, dst_ip, segment, want_dst_port)
        }
    }
}

#[inline]
fn parse_ethernet(frame: &[u8], want_dst_port: Option<u16>) -> Result<Parsed<'_>, EnvelopeError> {
    if frame.len() < ETHERNET_HEADER_LEN {
        return Err(EnvelopeError::TruncatedEthernet { len: frame.len() });
    }
    let dst_mac = mac(&frame[0..6]);
    let src_mac = mac(&frame[6..12]);
    let mut ethertype = be16(frame, 12);
    let mut off = ETHERNET_HEADER_LEN;
    let mut vlan = None;
    let mut tags = 0;
    while ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        if tags == MAX_VLAN_TAGS {
            return Err(EnvelopeError::TooManyVlanTags);
        }
        if frame.len() < off + VLAN_TAG_LEN {
            return Err(EnvelopeError::TruncatedVlan {
                offset: off,
                len: frame.len(),
            });
        }
        if vlan.is_none() {
            vlan = Some(be16(frame, off) & 0x0FFF);
        }
        ethertype = be16(frame, off + 2);
        off += VLAN_TAG_LEN;
        tags += 1;
    }
    let ip = &frame[off..];
    let (src_ip, dst_ip, segment) = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(ip)?,
        ETHERTYPE_IPV6 => parse_ipv6(ip)?,
        other => return Err(EnvelopeError::UnsupportedEtherType(other)),
    };
    parse_tcp(
        src_mac,
        dst_mac,
        vlan,
        src_ip,
        dst_ip,
        segment,
        want_dst_port,
    )
}

/// The TCP part common to every medium.
#[inline(always)]
fn parse_tcp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<u16>,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    segment: &[u8],
    want_dst_port: Option<u16>,
) -> Result<Parsed<'_>, EnvelopeError> {
    if segment.len() < 20 {
        return Err(EnvelopeError::TruncatedTcp { len: segment.len() });
    }
    let src_port = be16(segment, 0);
    let dst_port = be16(segment, 2);
    if let Some(want) = want_dst_port {
        if dst_port != want {
            return Err(EnvelopeError::WrongPort {
                want,
                found: dst_port,
            });
        }
    }
    let data_offset = segment[12] >> 4;
    let tcp_len = usize::from(data_offset) * 4;
    if tcp_len < 20 || tcp_len > segment.len() {
        return Err(EnvelopeError::BadTcpDataOffset {
            data_offset,
            available: segment.len(),
        });
    }
    let flags = TcpFlags((u16::from(segment[12] & 1) << 8) | u16::from(segment[13]));
    let payload = &segment[tcp_len..];
    if payload.is_empty() {
        return Err(EnvelopeError::EmptyPayload);
    }
    Ok(Parsed {
        src_mac,
        dst_mac,
        vlan,
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        flags,
        payload,
    })
}

/// IPv4 header → (src, dst, TCP segment trimmed to the total length).
#[inline]
fn parse_ipv4(ip: &[u8]) -> Result<(IpAddr, IpAddr, &[u8]), EnvelopeError> {
    if ip.len() < IPV4_HEADER_LEN {
        return Err(EnvelopeError::TruncatedIpv4 { len: ip.len() });
    }
    let version = ip[0] >> 4;
    if version != 4 {
        return Err(EnvelopeError::IpVersionMismatch {
            expected: 4,
            found: version,
        });
    }
    let ihl = ip[0] & 0x0F;
    if ihl < 5 {
        return Err(EnvelopeError::BadIpv4HeaderLen { ihl });
    }
    let header_len = usize::from(ihl) * 4;
    let total_len = usize::from(be16(ip, 2));
    if total_len < header_len || total_len > ip.len() {
        return Err(EnvelopeError::Ipv4LengthMismatch {
            total_len,
            header_len,
            available: ip.len(),
        });
    }
    let frag = be16(ip, 6);
    if frag & 0x3FFF != 0 {
        return Err(EnvelopeError::Fragmented {
            offset: (frag & 0x1FFF) * 8,
            more: frag & 0x2000 != 0,
        });
    }
    if ip[9] != IPPROTO_TCP {
        return Err(EnvelopeError::NotTcp(ip[9]));
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Ok((IpAddr::V4(src), IpAddr::V4(dst), &ip[header_len..total_len]))
}

/// True for the IPv6 next-header values IANA lists as extension headers.
#[inline]
fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// IPv6 header → (src, dst, TCP segment trimmed to the payload length).
#[inline]
fn parse_ipv6(ip: &[u8]) -> Result<(IpAddr, IpAddr, &[u8]), EnvelopeError> {
    if ip.len() < IPV6_HEADER_LEN {
        return Err(EnvelopeError::TruncatedIpv6 { len: ip.len() });
    }
    let version = ip[0] >> 4;
    if version != 6 {
        return Err(EnvelopeError::IpVersionMismatch {
            expected: 6,
            found: version,
        });
    }
    let payload_len = usize::from(be16(ip, 4));
    let available = ip.len() - IPV6_HEADER_LEN;
    if payload_len > available {
        return Err(EnvelopeError::Ipv6LengthMismatch {
            payload_len,
            available,
        });
    }
    let next_header = ip[6];
    if next_header != IPPROTO_TCP {
        return Err(if is_ipv6_extension(next_header) {
            EnvelopeError::Ipv6ExtensionHeader(next_header)
        } else {
            EnvelopeError::NotTcp(next_header)
        });
    }
    let mut s = [0u8; 16];
    s.copy_from_slice(&ip[8..24]);
    let mut d = [0u8; 16];
    d.copy_from_slice(&ip[24..40]);
    Ok((
        IpAddr::V6(Ipv6Addr::from(s)),
        IpAddr::V6(Ipv6Addr::from(d)),
        &ip[IPV6_HEADER_LEN..IPV6_HEADER_LEN + payload_len],
    ))
}

/// Fuzzing entry point: parses `data` as a whole frame (Ethernet and IP media), then as the payload of an
/// Ethernet header with the IPv4 and with the IPv6 EtherType (so the IP/TCP decoders are reached without
/// guessing 14 bytes first), with and without a port filter. Results are ignored; only panics matter.
pub fn fuzz_parse(data: &[u8]) {
    let _ = parse_frame(data, None);
    let _ = parse_frame(data, Some(9999));
    let _ = parse_frame_on(Medium::Ip, data, None);
    let _ = parse_frame_on(Medium::Ip, data, Some(9999));
    let mut frame = Vec::with_capacity(ETHERNET_HEADER_LEN + data.len());
    for ethertype in [ETHERTYPE_IPV4, ETHERTYPE_IPV6] {
        frame.clear();
        frame.extend_from_slice(&[0u8; 12]);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(data);
        let _ = parse_frame(&frame, None);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Checksums
// ------------------------------------------------------------------------------------------------------------

/// Unfolded one's-complement sum of `data` as big-endian 16-bit words (odd tail padded with a zero byte).
/// Adds 32-bit words into two 64-bit accumulators; folding later gives the 16-bit sum because
/// 2^16 ≡ 1 (mod 0xFFFF). Cannot overflow for inputs below 32 GiB.
#[inline]
pub fn sum_words(data: &[u8]) -> u64 {
    let mut a: u64 = 0;
    let mut b: u64 = 0;
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        a += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            + u64::from(u32::from_be_bytes([c[4], c[5], c[6], c[7]]));
        b += u64::from(u32::from_be_bytes([c[8], c[9], c[10], c[11]]))
            + u64::from(u32::from_be_bytes([c[12], c[13], c[14], c[15]]));
    }
    let mut rest = chunks.remainder();
    while rest.len() >= 4 {
        a += u64::from(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]));
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        b += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let [last] = rest {
        b += u64::from(*last) << 8;
    }
    a + b
}

/// Folds an unfolded sum (from [`sum_words`] and added terms) to 16 bits with end-around carries.
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

/// The 16-bit one's-complement sum of `data` (not complemented).
#[inline]
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    fold(sum_words(data))
}

/// The Internet checksum of `data` (RFC 1071): the complement of [`ones_complement_sum`]. Over a header that
/// contains a correct checksum the result is 0.
#[inline]
pub fn internet_checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(data)
}

/// Unfolded sum of the pseudo-header addresses (both must be the same family; mixed ones sum both).
#[inline]
fn address_sum(src: IpAddr, dst: IpAddr) -> u64 {
    let one = |a: IpAddr| match a {
        IpAddr::V4(a) => sum_words(&a.octets()),
        IpAddr::V6(a) => sum_words(&a.octets()),
    };
    one(src) + one(dst)
}

/// TCP/UDP checksum of `segment` with the pseudo-header of `src`, `dst` and `protocol`
/// (IPv4 or IPv6 form according to the address family). With the checksum field zeroed this is the value to
/// store; over a segment carrying a correct checksum it is 0.
pub fn transport_checksum(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> u16 {
    let sum =
        address_sum(src, dst) + u64::from(protocol) + segment.len() as u64 + sum_words(segment);
    !fold(sum)
}

// ------------------------------------------------------------------------------------------------------------
// Emit
// ------------------------------------------------------------------------------------------------------------

/// Builds the envelope of every frame one local socket sends, byte for byte as upstream alpha.21.
///
/// `time` is `uint32(unix ms at socket creation)` (passed in: no clock is read here). `counter` counts frames:
/// [`emit`](Self::emit) first increments it (wrapping) and then derives seq/ack/timestamps from the *new*
/// value, as upstream's `atomic.AddUint32(&tsCounter, 1)` does, so a fresh builder (`counter` 0) sends its
/// first frame with counter 1 — which is what the reference captures show. One builder serves one address
/// family; the destination may be changed per frame with [`set_destination`](Self::set_destination)
/// (a server socket talks to many clients with one counter). On [`Medium::Ip`]
/// ([`with_medium`](Self::with_medium)) the frame is the same without the Ethernet header.
#[derive(Debug, Clone)]
pub struct EnvelopeBuilder {
    /// Unix milliseconds (truncated to 32 bits) at socket creation.
    pub time: u32,
    /// Frames emitted so far (the next frame uses `counter + 1`).
    pub counter: u32,
    /// Link header (if any) + IP + first 20 TCP bytes with every per-frame field zero.
    template: [u8; MAX_HEADER_LEN],
    /// What frames start with; the IP header is at `medium.link_header_len()`.
    medium: Medium,
    /// Offset of the IP header in the template and in every frame (14 or 0).
    l3: usize,
    /// MACs (kept on every medium so a medium change can restore them).
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    /// 20 (IPv4) or 40 (IPv6).
    ip_len: usize,
    /// Unfolded sum of the constant IPv4 header words (IPv4 only; total length and checksum excluded).
    ipv4_fixed_sum: u64,
    /// Unfolded sum of the pseudo-header addresses and protocol.
    pseudo_sum: u64,
    src_ip: IpAddr,
    dst_ip: IpAddr,
}

impl EnvelopeBuilder {
    /// A builder for Ethernet frames `src_mac`/`src` → `dst_mac`/`dst`; `src` and `dst` must be the same
    /// family.
    pub fn new(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: SocketAddr,
        dst: SocketAddr,
        time: u32,
    ) -> Result<Self, EnvelopeError> {
        Self::new_on(Medium::Ethernet, src_mac, dst_mac, src, dst, time)
    }

    /// A builder for frames of `medium` (the MACs are kept but not written on [`Medium::Ip`]).
    pub fn new_on(
        medium: Medium,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: SocketAddr,
        dst: SocketAddr,
        time: u32,
    ) -> Result<Self, EnvelopeError> {
        let ip_len = match (src.ip(), dst.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => IPV4_HEADER_LEN,
            (IpAddr::V6(_), IpAddr::V6(_)) => IPV6_HEADER_LEN,
            (s, d) => return Err(EnvelopeError::MixedAddressFamilies { src: s, dst: d }),
        };
        let mut b = EnvelopeBuilder {
            time,
            counter: 0,
            template: [0u8; MAX_HEADER_LEN],
            medium,
            l3: medium.link_header_len(),
            src_mac,
            dst_mac,
            ip_len,
            ipv4_fixed_sum: 0,
            pseudo_sum: 0,
            src_ip: src.ip(),
            dst_ip: dst.ip(),
        };
        b.write_template(src, dst);
        Ok(b)
    }

    /// The same builder (time, counter, addresses) writing frames of `medium`.
    pub fn with_medium(mut self, medium: Medium) -> Self {
        if medium != self.medium {
            let (src, dst) = (self.source(), self.destination());
            self.medium = medium;
            self.l3 = medium.link_header_len();
            self.template = [0u8; MAX_HEADER_LEN];
            self.write_template(src, dst);
        }
        self
    }

    /// The medium frames are built for.
    pub fn medium(&self) -> Medium {
        self.medium
    }

    /// Fills the template for `src` → `dst` (same family, checked by the caller) on `self.medium`.
    fn write_template(&mut self, src: SocketAddr, dst: SocketAddr) {
        let ip = self.l3;
        let t = &mut self.template;
        let ethernet = self.medium == Medium::Ethernet;
        if ethernet {
            t[0..6].copy_from_slice(&self.dst_mac);
            t[6..12].copy_from_slice(&self.src_mac);
        }
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                if ethernet {
                    t[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                }
                t[ip] = 0x45;
                t[ip + 1] = TOS;
                // total length (2..4) per frame; ID 0; flags DF, fragment offset 0.
                t[ip + 6] = 0x40;
                t[ip + 8] = TTL;
                t[ip + 9] = IPPROTO_TCP;
                // checksum (10..12) per frame.
                t[ip + 12..ip + 16].copy_from_slice(&s.octets());
                t[ip + 16..ip + 20].copy_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                if ethernet {
                    t[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
                }
                // version 6, traffic class 184, flow label 0.
                t[ip] = 0x60 | (TOS >> 4);
                t[ip + 1] = (TOS & 0x0F) << 4;
                // payload length (4..6) per frame.
                t[ip + 6] = IPPROTO_TCP;
                t[ip + 7] = TTL;
                t[ip + 8..ip + 24].copy_from_slice(&s.octets());
                t[ip + 24..ip + 40].copy_from_slice(&d.octets());
            }
            _ => unreachable!("families checked by the constructor"),
        }
        let tcp = ip + self.ip_len;
        t[tcp..tcp + 2].copy_from_slice(&src.port().to_be_bytes());
        t[tcp + 2..tcp + 4].copy_from_slice(&dst.port().to_be_bytes());
        t[tcp + 14..tcp + 16].copy_from_slice(&0xFFFFu16.to_be_bytes());
        self.recompute_sums();
    }

    fn recompute_sums(&mut self) {
        let ip = self.l3;
        self.ipv4_fixed_sum = if self.ip_len == IPV4_HEADER_LEN {
            sum_words(&self.template[ip..ip + IPV4_HEADER_LEN])
        } else {
            0
        };
        self.pseudo_sum = address_sum(self.src_ip, self.dst_ip) + u64::from(IPPROTO_TCP);
    }

    /// Changes the peer (IP and port) for the following frames; the family must stay the same.
    /// Cheap when `dst` is unchanged.
    pub fn set_destination(&mut self, dst: SocketAddr) -> Result<(), EnvelopeError> {
        let tcp = self.l3 + self.ip_len;
        let ip = self.l3;
        match (self.src_ip, dst.ip()) {
            (IpAddr::V4(_), IpAddr::V4(d)) => {
                if self.dst_ip != dst.ip() {
                    self.template[ip + 16..ip + 20].copy_from_slice(&d.octets());
                }
            }
            (IpAddr::V6(_), IpAddr::V6(d)) => {
                if self.dst_ip != dst.ip() {
                    self.template[ip + 24..ip + 40].copy_from_slice(&d.octets());
                }
            }
            (s, d) => return Err(EnvelopeError::MixedAddressFamilies { src: s, dst: d }),
        }
        self.template[tcp + 2..tcp + 4].copy_from_slice(&dst.port().to_be_bytes());
        if self.dst_ip != dst.ip() {
            self.dst_ip = dst.ip();
            self.recompute_sums();
        }
        Ok(())
    }

    /// Changes the destination MAC (the `router_mac`) for the following frames (kept, not written, on
    /// [`Medium::Ip`]).
    pub fn set_dst_mac(&mut self, dst_mac: [u8; 6]) {
        self.dst_mac = dst_mac;
        if self.medium == Medium::Ethernet {
            self.template[0..6].copy_from_slice(&dst_mac);
        }
    }

    /// The current destination.
    pub fn destination(&self) -> SocketAddr {
        let tcp = self.l3 + self.ip_len;
        SocketAddr::new(self.dst_ip, be16(&self.template, tcp + 2))
    }

    /// The local address frames are sent from.
    pub fn source(&self) -> SocketAddr {
        let tcp = self.l3 + self.ip_len;
        SocketAddr::new(self.src_ip, be16(&self.template, tcp))
    }

    /// Bytes of header in front of the payload: 66 for IPv4, 86 for IPv6 on Ethernet (14 less on
    /// [`Medium::Ip`]), 8 more with SYN.
    #[inline]
    pub fn header_len(&self, flags: TcpFlags) -> usize {
        self.l3 + self.ip_len + Self::tcp_len(flags)
    }

    #[inline]
    fn tcp_len(flags: TcpFlags) -> usize {
        if flags.contains(TcpFlags::SYN) {
            TCP_SYN_HEADER_LEN
        } else {
            TCP_HEADER_LEN
        }
    }

    /// Writes the headers into `out[..header_len(flags)]` for a payload already placed at
    /// `out[header_len(flags)..header_len(flags) + payload_len]`, computes the IPv4 header checksum and the
    /// TCP checksum (pseudo-header + header + payload), increments `counter` and returns the frame length.
    /// On error nothing is written and `counter` is unchanged. Bits of `flags` above NS are ignored.
    pub fn emit(
        &mut self,
        flags: TcpFlags,
        payload_len: usize,
        out: &mut [u8],
    ) -> Result<usize, EnvelopeError> {
        let tcp_len = Self::tcp_len(flags);
        let l4 = self.l3 + self.ip_len;
        let hdr = l4 + tcp_len;
        let max_payload = usize::from(u16::MAX)
            - tcp_len
            - if self.ip_len == IPV4_HEADER_LEN {
                IPV4_HEADER_LEN
            } else {
                0
            };
        if payload_len > max_payload {
            return Err(EnvelopeError::PayloadTooLarge {
                len: payload_len,
                max: max_payload,
            });
        }
        let total = hdr + payload_len;
        if out.len() < total {
            return Err(EnvelopeError::BufferTooSmall {
                need: total,
                have: out.len(),
            });
        }
        let counter = self.counter.wrapping_add(1);
        self.counter = counter;
        let segment_len = tcp_len + payload_len;

        out[..l4 + 20].copy_from_slice(&self.template[..l4 + 20]);
        let ip = self.l3;
        if self.ip_len == IPV4_HEADER_LEN {
            let total_len = (IPV4_HEADER_LEN + segment_len) as u16;
            out[ip + 2..ip + 4].copy_from_slice(&total_len.to_be_bytes());
            let csum = !fold(self.ipv4_fixed_sum + u64::from(total_len));
            out[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
        } else {
            out[ip + 4..ip + 6].copy_from_slice(&(segment_len as u16).to_be_bytes());
        }

        let ts_val = self.time.wrapping_add(counter >> 3);
        let syn = flags.contains(TcpFlags::SYN);
        let (seq, ack) = if syn {
            let seq = 1 + (counter & 7);
            (
                seq,
                if flags.contains(TcpFlags::ACK) {
                    seq + 1
                } else {
                    0
                },
            )
        } else {
            let seq = self.time.wrapping_add(counter << 7);
            (seq, seq.wrapping_sub(counter & 0x3FF).wrapping_add(1400))
        };
        let tcp = &mut out[l4..total];
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = (((tcp_len / 4) as u8) << 4) | ((flags.0 >> 8) & 1) as u8;
        tcp[13] = flags.0 as u8;
        // window (14..16) from the template; checksum (16..18) and urgent pointer (18..20) zero.
        if syn {
            tcp[20..40].copy_from_slice(&[
                0x02, 0x04, 0x05, 0xB4, // MSS 1460
                0x04, 0x02, // SACK permitted
                0x08, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0,    // timestamps (TSecr 0)
                0x01, // NOP
                0x03, 0x03, 0x08, // window scale 8
            ]);
            tcp[28..32].copy_from_slice(&ts_val.to_be_bytes());
        } else {
            let ts_ecr = ts_val.wrapping_sub(counter % 200 + 50);
            tcp[20..24].copy_from_slice(&[0x01, 0x01, 0x08, 0x0A]);
            tcp[24..28].copy_from_slice(&ts_val.to_be_bytes());
            tcp[28..32].copy_from_slice(&ts_ecr.to_be_bytes());
        }
        let sum = self.pseudo_sum + segment_len as u64 + sum_words(tcp);
        let csum = !fold(sum);
        tcp[16..18].copy_from_slice(&csum.to_be_bytes());
        Ok(total)
    }

    /// Copies `payload` behind the header in `out`, then [`emit`](Self::emit)s.
    pub fn emit_with_payload(
        &mut self,
        flags: TcpFlags,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, EnvelopeError> {
        let hdr = self.header_len(flags);
        let total = hdr + payload.len();
        if out.len() < total {
            return Err(EnvelopeError::BufferTooSmall {
                need: total,
                have: out.len(),
            });
        }
        out[hdr..total].copy_from_slice(payload);
        self.emit(flags, payload.len(), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::pcapfile::PcapFile;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const CAPTURE_DIR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/testdata/upstream-alpha21"
    );
    const CAPTURES: [&str; 6] = ["fast", "gcm", "salsa", "fec", "none", "null"];
    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    const SERVER_PORT: u16 = 9999;

    fn read_capture(name: &str) -> Vec<u8> {
        let path = format!("{CAPTURE_DIR}/{name}.pcap");
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Straightforward RFC 1071 reference: 16-bit words, fold after every addition.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]) << 8;
            let lo = if i + 1 < data.len() {
                u32::from(data[i + 1])
            } else {
                0
            };
            sum += hi | lo;
            sum = (sum & 0xFFFF) + (sum >> 16);
            i += 2;
        }
        sum as u16
    }

    fn v4_builder(time: u32) -> EnvelopeBuilder {
        EnvelopeBuilder::new(
            CLIENT_MAC,
            SERVER_MAC,
            SocketAddr::new(CLIENT_IP.into(), 35748),
            SocketAddr::new(SERVER_IP.into(), SERVER_PORT),
            time,
        )
        .unwrap()
    }

    fn v6_builder(time: u32) -> EnvelopeBuilder {
        EnvelopeBuilder::new(
            CLIENT_MAC,
            SERVER_MAC,
            "[fd00::1]:40000".parse().unwrap(),
            "[fd00::2]:9999".parse().unwrap(),
            time,
        )
        .unwrap()
    }

    fn emit_vec(b: &mut EnvelopeBuilder, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; b.header_len(flags) + payload.len()];
        let n = b.emit_with_payload(flags, payload, &mut out).unwrap();
        assert_eq!(n, out.len());
        out
    }

    /// Both checksums of an emitted untagged frame verify.
    fn assert_checksums_valid(frame: &[u8]) {
        let p = parse_frame(frame, None).unwrap();
        match p.src_ip {
            IpAddr::V4(_) => {
                assert_eq!(internet_checksum(&frame[14..34]), 0, "IPv4 header checksum");
                let total = usize::from(be16(frame, 16));
                assert_eq!(
                    transport_checksum(p.src_ip, p.dst_ip, 6, &frame[34..14 + total]),
                    0,
                    "TCP checksum"
                );
            }
            IpAddr::V6(_) => {
                let plen = usize::from(be16(frame, 18));
                assert_eq!(
                    transport_checksum(p.src_ip, p.dst_ip, 6, &frame[54..54 + plen]),
                    0,
                    "TCP checksum"
                );
            }
        }
    }

    fn with_tags(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
        let mut v = frame[..12].to_vec();
        for (tpid, tci) in tags {
            v.extend_from_slice(&tpid.to_be_bytes());
            v.extend_from_slice(&tci.to_be_bytes());
        }
        v.extend_from_slice(&frame[12..]);
        v
    }

    // ---- checksum ------------------------------------------------------------------------------------------

    #[test]
    fn checksum_rfc1071_example() {
        let data = [0x00, 0x01, 0xF2, 0x03, 0xF4, 0xF5, 0xF6, 0xF7];
        assert_eq!(ones_complement_sum(&data), 0xDDF2);
        assert_eq!(internet_checksum(&data), 0x220D);
        assert_eq!(ones_complement_sum(&[]), 0);
        assert_eq!(ones_complement_sum(&[0xAB]), 0xAB00);
        assert_eq!(ones_complement_sum(&[0xFF; 64]), 0xFFFF);
    }

    // ---- flags ---------------------------------------------------------------------------------------------

    #[test]
    fn flag_letters() {
        assert_eq!(TcpFlags::from_letters("PA").unwrap(), TcpFlags(0x0018));
        assert_eq!(TcpFlags::from_letters("AP").unwrap(), TcpFlags::PSH_ACK);
        assert_eq!(TcpFlags::from_letters("FSRPAUECN").unwrap(), TcpFlags::ALL);
        assert_eq!(TcpFlags::from_letters("N").unwrap(), TcpFlags(0x100));
        assert_eq!(TcpFlags::from_letters("SS").unwrap(), TcpFlags::SYN);
        for bits in 1u16..0x200 {
            let f = TcpFlags(bits);
            let letters = f.to_letters();
            assert_eq!(TcpFlags::from_letters(&letters).unwrap(), f, "{letters}");
            assert_eq!(f.to_string(), letters);
        }
        assert_eq!(TcpFlags::PSH_ACK.to_letters(), "PA");
        assert_eq!(TcpFlags(0).to_string(), "-");
        assert_eq!(TcpFlags(0x418).to_string(), "PA+0x400");
        assert_eq!(format!("{:?}", TcpFlags::SYN), "TcpFlags(S = 0x002)");

        let e = TcpFlags::from_letters("PX").unwrap_err();
        assert_eq!(
            e,
            FlagError::BadLetter {
                letter: 'X',
                position: 1,
                input: "PX".into()
            }
        );
        assert!(e.to_string().contains("'X'"), "{e}");
        assert!(matches!(
            TcpFlags::from_letters("pa"),
            Err(FlagError::BadLetter {
                letter: 'p',
                position: 0,
                ..
            })
        ));
        assert_eq!(TcpFlags::from_letters(""), Err(FlagError::Empty));
    }

    #[test]
    fn flag_cycler_round_robin_like_upstream() {
        let c = FlagCycler::from_letters(&["PA", "A", "S"]).unwrap();
        let seq: Vec<TcpFlags> = (0..7).map(|_| c.next()).collect();
        let (pa, a, s) = (TcpFlags::PSH_ACK, TcpFlags::ACK, TcpFlags::SYN);
        // upstream increments its index before use: the first call yields entry 1.
        assert_eq!(seq, vec![a, s, pa, a, s, pa, a]);
        let d = c.clone();
        assert_eq!(d.next(), s);
        assert_eq!(c.flags(), &[pa, a, s]);

        let one = FlagCycler::from_letters(&["PA"]).unwrap();
        assert!((0..5).all(|_| one.next() == pa));

        assert_eq!(
            FlagCycler::from_letters::<&str>(&[]).unwrap_err(),
            FlagError::ListLength(0)
        );
        assert_eq!(
            FlagCycler::from_letters(&["A"; 65]).unwrap_err(),
            FlagError::ListLength(65)
        );
        assert_eq!(
            FlagCycler::new(vec![]).unwrap_err(),
            FlagError::ListLength(0)
        );
        assert_eq!(
            FlagCycler::from_letters(&["A"; 64]).unwrap().flags().len(),
            64
        );
        let e = FlagCycler::from_letters(&["PA", "PQ"]).unwrap_err();
        assert!(
            matches!(&e, FlagError::Entry { index: 1, source } if matches!(**source, FlagError::BadLetter { letter: 'Q', .. }))
        );
        assert!(
            e.to_string().contains("entry 1") && e.to_string().contains("'Q'"),
            "{e}"
        );
    }

    // ---- golden captures -----------------------------------------------------------------------------------

    #[test]
    fn golden_first_frame_of_fast_pcap() {
        let bytes = read_capture("fast");
        let pcap = PcapFile::parse(&bytes).unwrap();
        let frame = pcap.records[0].data;
        assert_eq!(frame.len(), 142);
        let p = parse_frame(frame, Some(SERVER_PORT)).unwrap();
        assert_eq!(p.src_mac, CLIENT_MAC);
        assert_eq!(p.dst_mac, SERVER_MAC);
        assert_eq!(p.vlan, None);
        assert_eq!(p.src_addr(), SocketAddr::new(CLIENT_IP.into(), 35748));
        assert_eq!(p.dst_addr(), SocketAddr::new(SERVER_IP.into(), SERVER_PORT));
        assert_eq!(p.flags, TcpFlags::PSH_ACK);
        let payload = hex::decode(
            "757278bc652b76ed7e937437784a1d3fee3a150016a072a7ebd49f2f10001a33a6ae13112481220756faa607d5e6c08d\
             648140d89f42a7a4fe2b9f42e5fe2204f67851f40a4df2c9c254c093",
        )
        .unwrap();
        assert_eq!(p.payload, &payload[..]);

        // Upstream's header of that frame; the socket's time is 0x23a6fcf5 and this is its first packet.
        let header = hex::decode(
            "020000000002020000000001080045b80080000040004006242e0ac800010ac800028ba4270f23a6fd7523a702ec8018ffff\
             a33a0000010108 0a23a6fcf523a6fcc2"
                .replace(' ', ""),
        )
        .unwrap();
        assert_eq!(&frame[..66], &header[..]);
        let mut b = v4_builder(0x23A6_FCF5);
        assert_eq!(b.header_len(TcpFlags::PSH_ACK), 66);
        let mut out = [0u8; 1514];
        out[66..66 + payload.len()].copy_from_slice(&payload);
        let n = b.emit(TcpFlags::PSH_ACK, payload.len(), &mut out).unwrap();
        assert_eq!(b.counter, 1, "first frame uses counter 1 (pre-increment)");
        assert_eq!(&out[..n], frame);
    }

    /// (time, counter) of a non-SYN upstream frame, recovered from seq and ack (exact while counter < 1024).
    fn derive_time_counter(tcp: &[u8]) -> (u32, u32) {
        let (seq, ack) = (be32(tcp, 4), be32(tcp, 8));
        let counter = seq.wrapping_add(1400).wrapping_sub(ack);
        (seq.wrapping_sub(counter << 7), counter)
    }

    #[test]
    fn every_capture_frame_parses_and_reemits_byte_for_byte() {
        for name in CAPTURES {
            let bytes = read_capture(name);
            let pcap = PcapFile::parse(&bytes).unwrap();
            assert!(!pcap.records.is_empty(), "{name}: empty capture");
            let mut next_counter = [1u32, 1u32]; // per direction: client → server, server → client
            let mut client_frames = 0;
            let mut buf = vec![0u8; 2048];
            for (i, rec) in pcap.records.iter().enumerate() {
                let frame = rec.data;
                let p =
                    parse_frame(frame, None).unwrap_or_else(|e| panic!("{name} frame {i}: {e}"));
                assert_eq!(p.flags, TcpFlags::PSH_ACK, "{name} frame {i}");
                assert_eq!(p.vlan, None);
                let dir = if p.dst_port == SERVER_PORT {
                    client_frames += 1;
                    assert_eq!(p.src_ip, IpAddr::V4(CLIENT_IP), "{name} frame {i}");
                    assert_eq!(p.dst_ip, IpAddr::V4(SERVER_IP), "{name} frame {i}");
                    assert_eq!(
                        (p.src_mac, p.dst_mac),
                        (CLIENT_MAC, SERVER_MAC),
                        "{name} frame {i}"
                    );
                    assert_eq!(parse_frame(frame, Some(SERVER_PORT)).unwrap(), p);
                    0
                } else {
                    assert_eq!(p.src_port, SERVER_PORT, "{name} frame {i}");
                    assert_eq!(p.src_ip, IpAddr::V4(SERVER_IP), "{name} frame {i}");
                    assert_eq!(
                        parse_frame(frame, Some(SERVER_PORT)),
                        Err(EnvelopeError::WrongPort {
                            want: SERVER_PORT,
                            found: p.dst_port
                        })
                    );
                    1
                };
                assert_eq!(p.payload.len(), frame.len() - 66, "{name} frame {i}");

                let (time, counter) = derive_time_counter(&frame[34..]);
                assert_eq!(
                    counter, next_counter[dir],
                    "{name} frame {i}: counters run 1, 2, 3… per socket"
                );
                next_counter[dir] += 1;
                let mut b =
                    EnvelopeBuilder::new(p.src_mac, p.dst_mac, p.src_addr(), p.dst_addr(), time)
                        .unwrap();
                b.counter = counter - 1;
                let n = b
                    .emit_with_payload(TcpFlags::PSH_ACK, p.payload, &mut buf)
                    .unwrap();
                assert_eq!(
                    hex::encode(&buf[..66]),
                    hex::encode(&frame[..66]),
                    "{name} frame {i}: header"
                );
                assert_eq!(&buf[..n], frame, "{name} frame {i}");
            }
            assert!(client_frames >= 7, "{name}: {client_frames} client frames");
        }
    }

    // ---- emit details --------------------------------------------------------------------------------------

    #[test]
    fn emit_non_syn_fields_with_wrapping_counter() {
        let time = 0xFFFF_FF00u32;
        let mut b = v4_builder(time);
        b.counter = u32::MAX - 1;
        let f = emit_vec(&mut b, TcpFlags::PSH_ACK, b"x");
        assert_eq!(b.counter, u32::MAX);
        let c = u64::from(u32::MAX);
        let m = |v: u64| (v % (1 << 32)) as u32;
        let seq = m(u64::from(time) + ((c << 7) % (1 << 32)));
        let ack = m(u64::from(seq) + (1 << 32) - (c & 0x3FF) + 1400);
        let tsval = m(u64::from(time) + (c >> 3));
        let tsecr = m(u64::from(tsval) + (1 << 32) - (c % 200 + 50));
        let tcp = &f[34..];
        assert_eq!((be32(tcp, 4), be32(tcp, 8)), (seq, ack));
        assert_eq!(&tcp[20..24], &[1, 1, 8, 10]);
        assert_eq!((be32(tcp, 24), be32(tcp, 28)), (tsval, tsecr));
        assert_eq!(tcp[12], 0x80);
        assert_eq!(be16(tcp, 14), 65535);
        assert_eq!(be16(tcp, 18), 0);
        assert_eq!(&f[14..24], &[0x45, 0xB8, 0, 67 - 14, 0, 0, 0x40, 0, 64, 6]);
        assert_checksums_valid(&f);
        // the counter wraps to 0 on the next frame
        let g = emit_vec(&mut b, TcpFlags::PSH_ACK, b"x");
        assert_eq!(b.counter, 0);
        assert_eq!(be32(&g[34..], 4), time);
    }

    #[test]
    fn emit_syn_options_seq_ack() {
        let mut b = v4_builder(5000);
        assert_eq!(b.header_len(TcpFlags::SYN), 74);
        let f = emit_vec(&mut b, TcpFlags::SYN, b"hello");
        let tcp = &f[34..];
        assert_eq!(tcp[12], 0xA0, "data offset 10");
        assert_eq!(tcp[13], 0x02);
        assert_eq!(
            (be32(tcp, 4), be32(tcp, 8)),
            (2, 0),
            "seq = 1 + (1 & 7), ack 0"
        );
        let mut opts =
            hex::decode("020405b4 0402 080a 00001388 00000000 01 030308".replace(' ', "")).unwrap();
        opts[8..12].copy_from_slice(&5000u32.to_be_bytes());
        assert_eq!(&tcp[20..40], &opts[..]);
        assert_eq!(&tcp[40..], b"hello");
        assert_checksums_valid(&f);

        b.counter = 15; // next is 16: seq = 1 + 0, TSval = time + 2
        let f = emit_vec(&mut b, TcpFlags::SYN | TcpFlags::ACK, b"hi");
        let tcp = &f[34..];
        assert_eq!(
            (be32(tcp, 4), be32(tcp, 8)),
            (1, 2),
            "SYN|ACK: ack = seq + 1"
        );
        assert_eq!(be32(tcp, 28), 5002);
        assert_eq!(be32(tcp, 32), 0, "TSecr 0 on SYN");
        assert_eq!(parse_frame(&f, None).unwrap().flags, TcpFlags(0x12));
    }

    #[test]
    fn emit_ns_flag_in_reserved_nibble() {
        let mut b = v4_builder(1);
        let flags = TcpFlags::NS | TcpFlags::PSH_ACK;
        let f = emit_vec(&mut b, flags, b"payload");
        assert_eq!(f[34 + 12], 0x81);
        assert_eq!(f[34 + 13], 0x18);
        assert_eq!(parse_frame(&f, None).unwrap().flags, flags);
        // bits above NS are not put on the wire
        let g = emit_vec(&mut b, TcpFlags(0xFE18), b"payload");
        assert_eq!((g[34 + 12], g[34 + 13]), (0x80, 0x18));
        assert_checksums_valid(&g);
    }

    #[test]
    fn emit_ipv6_header() {
        let mut b = v6_builder(77);
        assert_eq!(b.header_len(TcpFlags::PSH_ACK), 86);
        assert_eq!(b.header_len(TcpFlags::SYN), 94);
        let f = emit_vec(&mut b, TcpFlags::PSH_ACK, &[9u8; 100]);
        assert_eq!(f.len(), 186);
        assert_eq!(&f[12..14], &[0x86, 0xDD]);
        assert_eq!(
            &f[14..22],
            &[0x6B, 0x80, 0, 0, 0, 132, 6, 64],
            "tc 184, flow 0, plen, nh, hop"
        );
        let p = parse_frame(&f, Some(9999)).unwrap();
        assert_eq!(p.src_addr(), "[fd00::1]:40000".parse().unwrap());
        assert_eq!(p.dst_addr(), "[fd00::2]:9999".parse().unwrap());
        assert_eq!(p.payload, &[9u8; 100][..]);
        assert_checksums_valid(&f);
    }

    #[test]
    fn set_destination_and_mac() {
        let mut b = v4_builder(3);
        let other: SocketAddr = "10.200.0.9:1234".parse().unwrap();
        b.set_destination(other).unwrap();
        b.set_dst_mac([2, 0, 0, 0, 0, 9]);
        assert_eq!(b.destination(), other);
        assert_eq!(b.source(), SocketAddr::new(CLIENT_IP.into(), 35748));
        let f = emit_vec(&mut b, TcpFlags::PSH_ACK, b"abc");
        let p = parse_frame(&f, Some(1234)).unwrap();
        assert_eq!(p.dst_addr(), other);
        assert_eq!(p.dst_mac, [2, 0, 0, 0, 0, 9]);
        assert_checksums_valid(&f);
        // same destination again: still correct
        b.set_destination(other).unwrap();
        assert_checksums_valid(&emit_vec(&mut b, TcpFlags::PSH_ACK, b"abc"));
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert!(matches!(
            b.set_destination(v6),
            Err(EnvelopeError::MixedAddressFamilies { .. })
        ));

        let mut b6 = v6_builder(3);
        let d6: SocketAddr = "[fd00::7]:7".parse().unwrap();
        b6.set_destination(d6).unwrap();
        let f = emit_vec(&mut b6, TcpFlags::PSH_ACK, b"abc");
        assert_eq!(parse_frame(&f, None).unwrap().dst_addr(), d6);
        assert_checksums_valid(&f);
    }

    #[test]
    fn emit_errors() {
        let mut b = v4_builder(0);
        let mut small = [0u8; 70];
        assert_eq!(
            b.emit(TcpFlags::PSH_ACK, 5, &mut small),
            Err(EnvelopeError::BufferTooSmall { need: 71, have: 70 })
        );
        assert_eq!(
            b.emit_with_payload(TcpFlags::PSH_ACK, &[0; 5], &mut small),
            Err(EnvelopeError::BufferTooSmall { need: 71, have: 70 })
        );
        assert_eq!(
            b.emit(TcpFlags::PSH_ACK, 65484, &mut small),
            Err(EnvelopeError::PayloadTooLarge {
                len: 65484,
                max: 65483
            })
        );
        assert_eq!(b.counter, 0, "failed emits do not count");
        let mut big = vec![0u8; 66 + 65483];
        assert_eq!(b.emit(TcpFlags::PSH_ACK, 65483, &mut big), Ok(big.len()));
        assert_checksums_valid(&big);
        let mut b6 = v6_builder(0);
        assert_eq!(
            b6.emit(TcpFlags::PSH_ACK, 65504, &mut big),
            Err(EnvelopeError::PayloadTooLarge {
                len: 65504,
                max: 65503
            })
        );
        let e = EnvelopeBuilder::new(
            CLIENT_MAC,
            SERVER_MAC,
            "1.2.3.4:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
            0,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("1.2.3.4") && e.to_string().contains("::1"),
            "{e}"
        );
    }

    // ---- parse details -------------------------------------------------------------------------------------

    #[test]
    fn parse_trims_padding_and_reads_vlan_tags() {
        let mut b = v4_builder(0);
        let f = emit_vec(&mut b, TcpFlags::PSH_ACK, b"x");
        let mut padded = f.clone();
        padded.extend_from_slice(&[0xEE; 12]);
        assert_eq!(parse_frame(&padded, None).unwrap().payload, b"x");

        let mut b6 = v6_builder(0);
        let f6 = emit_vec(&mut b6, TcpFlags::PSH_ACK, b"yz");
        let mut padded6 = f6.clone();
        padded6.extend_from_slice(&[0xEE; 4]);
        assert_eq!(parse_frame(&padded6, None).unwrap().payload, b"yz");

        let base = parse_frame(&f, None).unwrap();
        let tagged = with_tags(&f, &[(ETHERTYPE_VLAN, 0xE000 | 42)]);
        let p = parse_frame(&tagged, None).unwrap();
        assert_eq!(p.vlan, Some(42));
        assert_eq!(Parsed { vlan: None, ..p }, base);
        let qinq = with_tags(&f6, &[(ETHERTYPE_QINQ, 100), (ETHERTYPE_VLAN, 200)]);
        assert_eq!(parse_frame(&qinq, None).unwrap().vlan, Some(100));
        let three = with_tags(
            &f,
            &[
                (ETHERTYPE_QINQ, 1),
                (ETHERTYPE_VLAN, 2),
                (ETHERTYPE_VLAN, 3),
            ],
        );
        assert_eq!(
            parse_frame(&three, None),
            Err(EnvelopeError::TooManyVlanTags)
        );
        assert_eq!(
            parse_frame(&tagged[..16], None),
            Err(EnvelopeError::TruncatedVlan {
                offset: 14,
                len: 16
            })
        );
    }

    #[test]
    fn parse_errors_name_the_offender() {
        let mut b = v4_builder(0);
        let f = emit_vec(&mut b, TcpFlags::PSH_ACK, b"data");
        let patch = |at: usize, bytes: &[u8]| {
            let mut g = f.clone();
            g[at..at + bytes.len()].copy_from_slice(bytes);
            g
        };
        let parse = |g: &[u8]| parse_frame(g, None).unwrap_err();
        assert_eq!(
            parse(&f[..13]),
            EnvelopeError::TruncatedEthernet { len: 13 }
        );
        let arp = parse(&patch(12, &[0x08, 0x06]));
        assert_eq!(arp, EnvelopeError::UnsupportedEtherType(0x0806));
        assert!(arp.to_string().contains("0x0806"), "{arp}");
        assert_eq!(parse(&f[..30]), EnvelopeError::TruncatedIpv4 { len: 16 });
        assert_eq!(
            parse(&patch(14, &[0x65])),
            EnvelopeError::IpVersionMismatch {
                expected: 4,
                found: 6
            }
        );
        assert_eq!(
            parse(&patch(14, &[0x44])),
            EnvelopeError::BadIpv4HeaderLen { ihl: 4 }
        );
        assert_eq!(
            parse(&patch(16, &[0x01, 0x00])),
            EnvelopeError::Ipv4LengthMismatch {
                total_len: 256,
                header_len: 20,
                available: 56
            }
        );
        assert_eq!(
            parse(&patch(16, &[0x00, 0x10])),
            EnvelopeError::Ipv4LengthMismatch {
                total_len: 16,
                header_len: 20,
                available: 56
            }
        );
        assert_eq!(
            parse(&patch(20, &[0x20, 0x00])),
            EnvelopeError::Fragmented {
                offset: 0,
                more: true
            }
        );
        assert_eq!(
            parse(&patch(20, &[0x40, 0x02])),
            EnvelopeError::Fragmented {
                offset: 16,
                more: false
            }
        );
        assert_eq!(parse(&patch(23, &[17])), EnvelopeError::NotTcp(17));
        assert_eq!(
            parse(&patch(16, &[0x00, 30])),
            EnvelopeError::TruncatedTcp { len: 10 }
        );
        assert_eq!(
            parse(&patch(46, &[0x40])),
            EnvelopeError::BadTcpDataOffset {
                data_offset: 4,
                available: 36
            }
        );
        assert_eq!(
            parse(&patch(46, &[0xF0])),
            EnvelopeError::BadTcpDataOffset {
                data_offset: 15,
                available: 36
            }
        );
        assert_eq!(
            parse_frame(&f, Some(80)),
            Err(EnvelopeError::WrongPort {
                want: 80,
                found: 9999
            })
        );
        let empty = emit_vec(&mut b, TcpFlags::ACK, b"");
        assert_eq!(parse_frame(&empty, None), Err(EnvelopeError::EmptyPayload));

        let mut b6 = v6_builder(0);
        let f6 = emit_vec(&mut b6, TcpFlags::PSH_ACK, b"data");
        let patch6 = |at: usize, bytes: &[u8]| {
            let mut g = f6.clone();
            g[at..at + bytes.len()].copy_from_slice(bytes);
            g
        };
        assert_eq!(parse(&f6[..53]), EnvelopeError::TruncatedIpv6 { len: 39 });
        assert_eq!(
            parse(&patch6(14, &[0x4B])),
            EnvelopeError::IpVersionMismatch {
                expected: 6,
                found: 4
            }
        );
        assert_eq!(
            parse(&patch6(18, &[0, 37])),
            EnvelopeError::Ipv6LengthMismatch {
                payload_len: 37,
                available: 36
            }
        );
        assert_eq!(
            parse(&patch6(20, &[0])),
            EnvelopeError::Ipv6ExtensionHeader(0)
        );
        assert_eq!(
            parse(&patch6(20, &[44])),
            EnvelopeError::Ipv6ExtensionHeader(44)
        );
        assert_eq!(parse(&patch6(20, &[58])), EnvelopeError::NotTcp(58));
        assert_eq!(
            parse(&patch6(18, &[0, 19])),
            EnvelopeError::TruncatedTcp { len: 19 }
        );
    }

    #[test]
    fn reasons_are_distinct() {
        let ip: IpAddr = Ipv4Addr::LOCALHOST.into();
        let all = [
            EnvelopeError::TruncatedEthernet { len: 0 },
            EnvelopeError::TruncatedVlan { offset: 0, len: 0 },
            EnvelopeError::TooManyVlanTags,
            EnvelopeError::UnsupportedEtherType(0),
            EnvelopeError::EmptyIpPacket,
            EnvelopeError::UnsupportedIpVersion(0),
            EnvelopeError::IpVersionMismatch {
                expected: 4,
                found: 0,
            },
            EnvelopeError::TruncatedIpv4 { len: 0 },
            EnvelopeError::BadIpv4HeaderLen { ihl: 0 },
            EnvelopeError::Ipv4LengthMismatch {
                total_len: 0,
                header_len: 0,
                available: 0,
            },
            EnvelopeError::Fragmented {
                offset: 0,
                more: true,
            },
            EnvelopeError::TruncatedIpv6 { len: 0 },
            EnvelopeError::Ipv6LengthMismatch {
                payload_len: 0,
                available: 0,
            },
            EnvelopeError::Ipv6ExtensionHeader(0),
            EnvelopeError::NotTcp(0),
            EnvelopeError::TruncatedTcp { len: 0 },
            EnvelopeError::BadTcpDataOffset {
                data_offset: 0,
                available: 0,
            },
            EnvelopeError::WrongPort { want: 0, found: 0 },
            EnvelopeError::EmptyPayload,
            EnvelopeError::BufferTooSmall { need: 0, have: 0 },
            EnvelopeError::PayloadTooLarge { len: 0, max: 0 },
            EnvelopeError::MixedAddressFamilies { src: ip, dst: ip },
        ];
        let reasons: HashSet<&str> = all.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons.len(), all.len());
        assert!(reasons.iter().all(|r| !r.is_empty()
            && r.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
    }

    // ---- medium --------------------------------------------------------------------------------------------

    #[test]
    fn medium_from_arphrd_and_names() {
        assert_eq!(Medium::default(), Medium::Ethernet);
        assert_eq!(Medium::from_arphrd(1), Some(Medium::Ethernet));
        assert_eq!(Medium::from_arphrd(772), Some(Medium::Ethernet));
        for t in [65534, 512, 519, 768, 769, 776, 778] {
            assert_eq!(Medium::from_arphrd(t), Some(Medium::Ip), "ARPHRD {t}");
            assert_ne!(Medium::arphrd_name(t), "unknown");
        }
        // 801 = ARPHRD_IEEE80211_RADIOTAP, 24 = ARPHRD_IEEE1394: no IP frames paqet could build.
        assert_eq!(Medium::from_arphrd(801), None);
        assert_eq!(Medium::from_arphrd(24), None);
        assert_eq!(Medium::arphrd_name(801), "unknown");
        assert_eq!(Medium::Ethernet.to_string(), "ethernet");
        assert_eq!(Medium::Ip.to_string(), "ip");
        assert_eq!(Medium::Ip.link_header_len(), 0);
        assert_eq!(Medium::Ethernet.link_header_len(), ETHERNET_HEADER_LEN);
        assert!(Medium::Ethernet.has_link_addresses() && !Medium::Ip.has_link_addresses());
    }

    /// Emits the same frames (same counter) on both media; the IP-medium frame is the Ethernet frame
    /// without its first 14 bytes and parses to the same fields (MACs zero).
    fn ip_medium_matches_ethernet(mut eth: EnvelopeBuilder, mut ip: EnvelopeBuilder) {
        assert_eq!(ip.medium(), Medium::Ip);
        for (flags, payload) in [
            (TcpFlags::PSH_ACK, &b"paqet over tun"[..]),
            (TcpFlags::SYN, &b"s"[..]),
            (TcpFlags::SYN | TcpFlags::ACK, &[0xAB; 1200][..]),
            (TcpFlags::ACK, &b"x"[..]),
        ] {
            assert_eq!(ip.header_len(flags) + 14, eth.header_len(flags));
            let fe = emit_vec(&mut eth, flags, payload);
            let fi = emit_vec(&mut ip, flags, payload);
            assert_eq!(
                &fe[14..],
                &fi[..],
                "{flags}: IP frame = Ethernet frame minus 14 bytes"
            );
            let pe = parse_frame(&fe, Some(eth.destination().port())).unwrap();
            let pi = parse_frame_on(Medium::Ip, &fi, Some(ip.destination().port())).unwrap();
            assert_eq!(
                pi,
                Parsed {
                    src_mac: [0; 6],
                    dst_mac: [0; 6],
                    ..pe
                }
            );
            assert_eq!(pi.payload, payload);
            assert_eq!(pi.src_addr(), ip.source());
            assert_eq!(pi.dst_addr(), ip.destination());
            assert_eq!(pi.flags, flags);
            // The Ethernet parser of the same medium call is the old one, byte for byte.
            assert_eq!(
                parse_frame_on(Medium::Ethernet, &fe, None),
                parse_frame(&fe, None)
            );
            let mut relinked = vec![0u8; 14];
            relinked[12..14].copy_from_slice(&fe[12..14]);
            relinked.extend_from_slice(&fi);
            assert_checksums_valid(&relinked);
        }
        assert_eq!(eth.counter, ip.counter);
    }

    #[test]
    fn ip_medium_round_trip_v4() {
        let ip = EnvelopeBuilder::new_on(
            Medium::Ip,
            CLIENT_MAC,
            SERVER_MAC,
            SocketAddr::new(CLIENT_IP.into(), 35748),
            SocketAddr::new(SERVER_IP.into(), SERVER_PORT),
            77,
        )
        .unwrap();
        ip_medium_matches_ethernet(v4_builder(77), ip);
        // with_medium converts an existing builder the same way
        ip_medium_matches_ethernet(v4_builder(78), v4_builder(78).with_medium(Medium::Ip));
    }

    #[test]
    fn ip_medium_round_trip_v6() {
        ip_medium_matches_ethernet(v6_builder(5), v6_builder(5).with_medium(Medium::Ip));
        let mut b = v6_builder(5).with_medium(Medium::Ip);
        let f = emit_vec(&mut b, TcpFlags::PSH_ACK, b"six");
        assert_eq!(f[0] >> 4, 6);
        assert_eq!(f.len(), 40 + 32 + 3);
        let p = parse_frame_on(Medium::Ip, &f, Some(9999)).unwrap();
        assert_eq!(p.src_addr(), "[fd00::1]:40000".parse().unwrap());
        assert_eq!(p.payload, b"six");
    }

    #[test]
    fn medium_switch_keeps_state_and_macs() {
        let mut b = v4_builder(9);
        let f1 = emit_vec(&mut b, TcpFlags::PSH_ACK, b"a");
        let mut ip = b.clone().with_medium(Medium::Ip);
        assert_eq!(ip.counter, 1);
        ip.set_dst_mac([2, 0, 0, 0, 0, 0x99]); // remembered, not written
        let other: SocketAddr = "10.200.0.7:7000".parse().unwrap();
        ip.set_destination(other).unwrap();
        let f2 = emit_vec(&mut ip, TcpFlags::PSH_ACK, b"b");
        let p = parse_frame_on(Medium::Ip, &f2, Some(7000)).unwrap();
        assert_eq!(p.dst_addr(), other);
        assert_eq!(p.dst_mac, [0; 6]);
        let mut back = ip.with_medium(Medium::Ethernet);
        assert_eq!(back.medium(), Medium::Ethernet);
        let f3 = emit_vec(&mut back, TcpFlags::PSH_ACK, b"c");
        let p = parse_frame(&f3, Some(7000)).unwrap();
        assert_eq!(p.dst_mac, [2, 0, 0, 0, 0, 0x99]);
        assert_eq!(p.src_mac, CLIENT_MAC);
        assert_eq!(back.counter, 3);
        assert_checksums_valid(&f3);
        // same medium: unchanged builder
        let same = v4_builder(9).with_medium(Medium::Ethernet);
        assert_eq!(emit_vec(&mut same.clone(), TcpFlags::PSH_ACK, b"a"), f1);
    }

    #[test]
    fn ip_medium_parse_errors() {
        assert_eq!(
            parse_frame_on(Medium::Ip, &[], None),
            Err(EnvelopeError::EmptyIpPacket)
        );
        assert_eq!(
            parse_frame_on(Medium::Ip, &[0x55; 60], None),
            Err(EnvelopeError::UnsupportedIpVersion(5))
        );
        // An Ethernet frame read as a bare IP packet (first byte 0x02 of the MAC) is rejected, and a bare
        // IP packet read as Ethernet is too: the medium must match the interface.
        let mut b = v4_builder(0);
        let eth = emit_vec(&mut b, TcpFlags::PSH_ACK, b"z");
        assert_eq!(
            parse_frame_on(Medium::Ip, &eth, None),
            Err(EnvelopeError::UnsupportedIpVersion(0))
        );
        let ip = &eth[14..];
        assert!(parse_frame(ip, None).is_err());
        assert_eq!(
            parse_frame_on(Medium::Ip, &ip[..19], None),
            Err(EnvelopeError::TruncatedIpv4 { len: 19 })
        );
        assert_eq!(
            parse_frame_on(Medium::Ip, ip, Some(1)),
            Err(EnvelopeError::WrongPort {
                want: 1,
                found: 9999
            })
        );
        let mut b6 = v6_builder(0).with_medium(Medium::Ip);
        let ip6 = emit_vec(&mut b6, TcpFlags::PSH_ACK, b"z");
        assert_eq!(
            parse_frame_on(Medium::Ip, &ip6[..39], None),
            Err(EnvelopeError::TruncatedIpv6 { len: 39 })
        );
        // trailing bytes past the IP length are trimmed, as on Ethernet
        let mut padded = ip6.clone();
        padded.extend_from_slice(&[0xEE; 6]);
        assert_eq!(
            parse_frame_on(Medium::Ip, &padded, None).unwrap().payload,
            b"z"
        );
        let e = EnvelopeError::UnsupportedIpVersion(5);
        assert!(e.to_string().contains("version 5"), "{e}");
    }

    #[test]
    fn fuzz_entry_handles_edge_inputs() {
        fuzz_parse(&[]);
        fuzz_parse(&[0x45]);
        fuzz_parse(&[0x60; 40]);
        let mut b = v4_builder(0);
        fuzz_parse(&emit_vec(&mut b, TcpFlags::PSH_ACK, b"q"));
    }

    // ---- properties ----------------------------------------------------------------------------------------

    fn addr_pair() -> impl Strategy<Value = (IpAddr, IpAddr)> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<[u8; 4]>())
                .prop_map(|(a, b)| (IpAddr::from(a), IpAddr::from(b))),
            (any::<[u8; 16]>(), any::<[u8; 16]>())
                .prop_map(|(a, b)| (IpAddr::from(a), IpAddr::from(b))),
        ]
    }

    proptest! {
        #[test]
        fn sum_matches_reference(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            prop_assert_eq!(ones_complement_sum(&data), reference_sum(&data));
        }

        #[test]
        fn emit_parse_round_trip(
            (src_ip, dst_ip) in addr_pair(),
            src_port in any::<u16>(),
            dst_port in any::<u16>(),
            macs in any::<([u8; 6], [u8; 6])>(),
            flags in 0u16..0x200,
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
            time in any::<u32>(),
            counter in any::<u32>(),
            vlan in proptest::option::of(0u16..4096),
        ) {
            let flags = TcpFlags(flags);
            let mut b = EnvelopeBuilder::new(
                macs.0, macs.1, SocketAddr::new(src_ip, src_port), SocketAddr::new(dst_ip, dst_port), time,
            ).unwrap();
            b.counter = counter;
            let mut frame = vec![0u8; b.header_len(flags) + payload.len()];
            let n = b.emit_with_payload(flags, &payload, &mut frame).unwrap();
            prop_assert_eq!(n, frame.len());
            prop_assert_eq!(b.counter, counter.wrapping_add(1));
            let wire = match vlan { Some(v) => with_tags(&frame, &[(ETHERTYPE_VLAN, v)]), None => frame.clone() };
            match parse_frame(&wire, Some(dst_port)) {
                Ok(p) => {
                    prop_assert!(!payload.is_empty());
                    prop_assert_eq!(p, Parsed {
                        src_mac: macs.0, dst_mac: macs.1, vlan, src_ip, dst_ip, src_port, dst_port, flags,
                        payload: &payload[..],
                    });
                    assert_checksums_valid(&frame);
                }
                Err(e) => {
                    prop_assert!(payload.is_empty());
                    prop_assert_eq!(e, EnvelopeError::EmptyPayload);
                }
            }
            if dst_port != 0 {
                let wrong = parse_frame(&wire, Some(dst_port - 1));
                prop_assert_eq!(wrong, Err(EnvelopeError::WrongPort { want: dst_port - 1, found: dst_port }));
            }
        }

        #[test]
        fn truncation_is_an_error(
            (src_ip, dst_ip) in addr_pair(),
            flags in 0u16..0x200,
            payload in proptest::collection::vec(any::<u8>(), 1..300),
            vlan in any::<bool>(),
        ) {
            let mut b = EnvelopeBuilder::new(
                [1; 6], [2; 6], SocketAddr::new(src_ip, 1), SocketAddr::new(dst_ip, 2), 0,
            ).unwrap();
            let mut frame = vec![0u8; b.header_len(TcpFlags(flags)) + payload.len()];
            b.emit_with_payload(TcpFlags(flags), &payload, &mut frame).unwrap();
            let wire = if vlan { with_tags(&frame, &[(ETHERTYPE_VLAN, 5)]) } else { frame };
            prop_assert!(parse_frame(&wire, None).is_ok());
            for len in 0..wire.len() {
                prop_assert!(parse_frame(&wire[..len], None).is_err(), "accepted a frame cut at {}", len);
            }
        }

        #[test]
        fn ip_medium_emit_parse_round_trip(
            (src_ip, dst_ip) in addr_pair(),
            src_port in any::<u16>(),
            dst_port in any::<u16>(),
            flags in 0u16..0x200,
            payload in proptest::collection::vec(any::<u8>(), 1..1500),
            time in any::<u32>(),
        ) {
            let flags = TcpFlags(flags);
            let (src, dst) = (SocketAddr::new(src_ip, src_port), SocketAddr::new(dst_ip, dst_port));
            let mut b = EnvelopeBuilder::new_on(Medium::Ip, [1; 6], [2; 6], src, dst, time).unwrap();
            let mut frame = vec![0u8; b.header_len(flags) + payload.len()];
            let n = b.emit_with_payload(flags, &payload, &mut frame).unwrap();
            prop_assert_eq!(n, frame.len());
            let p = parse_frame_on(Medium::Ip, &frame, Some(dst_port)).unwrap();
            prop_assert_eq!(p, Parsed {
                src_mac: [0; 6], dst_mac: [0; 6], vlan: None, src_ip, dst_ip, src_port, dst_port, flags,
                payload: &payload[..],
            });
            for len in 0..frame.len() {
                prop_assert!(parse_frame_on(Medium::Ip, &frame[..len], None).is_err(), "accepted a cut at {}", len);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_parse(&data);
        }

        #[test]
        fn mutated_frames_never_panic(
            (src_ip, dst_ip) in addr_pair(),
            edits in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
            cut in 0usize..300,
        ) {
            let mut b = EnvelopeBuilder::new(
                [1; 6], [2; 6], SocketAddr::new(src_ip, 1), SocketAddr::new(dst_ip, 2), 0,
            ).unwrap();
            let mut frame = vec![0u8; b.header_len(TcpFlags::PSH_ACK) + 100];
            b.emit(TcpFlags::PSH_ACK, 100, &mut frame).unwrap();
            for (at, v) in edits {
                if let Some(x) = frame.get_mut(at) { *x = v; }
            }
            frame.truncate(cut.min(frame.len()));
            if let Ok(p) = parse_frame(&frame, None) {
                prop_assert!(!p.payload.is_empty());
                prop_assert!(p.payload.len() < frame.len());
            }
        }
    }
}
