//! The optional packet guard (`transport.kcp.guard`, a paqet-dp feature, not upstream paqet's): a prefix
//! in front of every kcp-go datagram inside the TCP payload that the receiver checks before any
//! decryption (and, in XDP mode, the XDP program before anything reaches userspace). Two formats
//! (`transport.kcp.guard_format`):
//!
//! - **`tag`** (default): 8 bytes, `SipHash-2-4(tag_key, head[16] | context[8] | addresses)` little-endian,
//!   where `head` is the first 16 bytes of the kcp-go datagram (its random nonce) and the context and
//!   addresses bind the packet to the server's tunnel port (`guard_bind = "port"`), to the whole 4-tuple
//!   (`"4tuple"`) or to nothing (`"none"`); byte layout in [`paqet_common::tag`]. No constant bytes:
//!   every packet's tag differs, and to anyone without the key it is indistinguishable from the random
//!   nonce that follows. `tag_key` = `HMAC-SHA256(gkey, "paqet-dp guard tag v1")[..16]`.
//! - **`cookie`** (deprecated, the `changecoin938/Tunnel` fork's format, spec §5): 12 bytes
//!   `magic[4] | cookie[8]` with `cookie(win) = HMAC-SHA256(gkey, magic || win as u64be)[:8]`,
//!   `win = unix_seconds / window`; the receiver accepts the cookies of windows `now − 0 ..= now − skew`.
//!   Constant magic and one cookie for every client for a whole window: a fingerprint, replayable.
//!
//! `gkey = PBKDF2-HMAC-SHA256(kcp.key, "paqet_guard", 100000, 32)` for both.
//!
//! Sans-IO like the rest of `proto`: the caller passes unix seconds and the packet's addresses
//! ([`Addressing`]). The endpoint ([`crate::proto::endpoint`]) checks the prefix of every received
//! datagram; the worker writes it on send; `paqet-dp dump` strips it.
use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use paqet_common::tag::{
    guard_tag, tag_context, TagAddrs, BIND_4TUPLE, BIND_NONE, BIND_PORT, DIR_TO_CLIENT,
    DIR_TO_SERVER, TAG_HEAD_LEN, TAG_LEN,
};
use sha2::Sha256;

/// Bytes the cookie format puts in front of every datagram.
pub const GUARD_LEN: usize = 12;
/// Bytes the tag format puts in front of every datagram.
pub const GUARD_TAG_LEN: usize = TAG_LEN;

/// `transport.kcp.guard_format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuardFormat {
    /// The per-packet keyed tag (default).
    #[default]
    Tag,
    /// The deprecated `magic | cookie` prefix.
    Cookie,
}

impl GuardFormat {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardFormat::Tag => "tag",
            GuardFormat::Cookie => "cookie",
        }
    }
}

impl std::fmt::Display for GuardFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GuardFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tag" => Ok(GuardFormat::Tag),
            "cookie" => Ok(GuardFormat::Cookie),
            _ => Err("must be one of: tag, cookie".into()),
        }
    }
}

/// `transport.kcp.guard_bind`: what of the packet's addressing the tag covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuardBind {
    /// The server's tunnel port (survives NAT of the client's address and port, and 1:1 NAT of the
    /// server's address). Default.
    #[default]
    Port,
    /// Source and destination addresses and ports (only for paths without NAT).
    FourTuple,
    /// Nothing but the datagram.
    None,
}

impl GuardBind {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardBind::Port => "port",
            GuardBind::FourTuple => "4tuple",
            GuardBind::None => "none",
        }
    }

    /// The binding byte of the tag message.
    pub fn code(self) -> u8 {
        match self {
            GuardBind::Port => BIND_PORT,
            GuardBind::FourTuple => BIND_4TUPLE,
            GuardBind::None => BIND_NONE,
        }
    }
}

impl std::fmt::Display for GuardBind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GuardBind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "port" => Ok(GuardBind::Port),
            "4tuple" => Ok(GuardBind::FourTuple),
            "none" => Ok(GuardBind::None),
            _ => Err("must be one of: port, 4tuple, none".into()),
        }
    }
}

/// `io.probe_response`: what the XDP program does with frames to the tunnel that carry no tunnel
/// datagram (no payload, or a payload failing the guard).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProbeResponse {
    /// Answer like a closed port of this host (an RST built in XDP). Default.
    #[default]
    Closed,
    /// Drop them.
    Silent,
}

impl std::fmt::Display for ProbeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProbeResponse::Closed => "closed",
            ProbeResponse::Silent => "silent",
        })
    }
}

impl std::str::FromStr for ProbeResponse {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "closed" => Ok(ProbeResponse::Closed),
            "silent" => Ok(ProbeResponse::Silent),
            _ => Err("must be one of: closed, silent".into()),
        }
    }
}

/// Guard settings (already validated by the config module).
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// `guard_format`.
    pub format: GuardFormat,
    /// `guard_bind` (tag format only).
    pub bind: GuardBind,
    /// Exactly 4 bytes (`guard_magic`, default `PQT1`; cookie format only).
    pub magic: [u8; 4],
    /// Window length in seconds (`guard_window`, 1..=3600; cookie format only).
    pub window_secs: u64,
    /// Older windows still accepted (`guard_skew`, 0..=10; cookie format only).
    pub skew: u64,
}

impl GuardConfig {
    /// The tag format with binding `bind` (the cookie fields at their defaults).
    pub fn tag(bind: GuardBind) -> Self {
        GuardConfig {
            format: GuardFormat::Tag,
            bind,
            magic: *b"PQT1",
            window_secs: 30,
            skew: 1,
        }
    }

    /// The deprecated cookie format.
    pub fn cookie(magic: [u8; 4], window_secs: u64, skew: u64) -> Self {
        GuardConfig {
            format: GuardFormat::Cookie,
            bind: GuardBind::Port,
            magic,
            window_secs,
            skew,
        }
    }
}

/// The addressing of one datagram, as the tag binds it: the packet's source and destination as they
/// are on the wire where it is sent or received, and its direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addressing {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// True for client → server datagrams.
    pub to_server: bool,
}

impl Addressing {
    /// The server's tunnel port: the destination port towards the server, the source port back.
    pub fn server_port(&self) -> u16 {
        if self.to_server {
            self.dst.port()
        } else {
            self.src.port()
        }
    }
}

/// The tag of `datagram` (its first 16 bytes, zero-padded) under `key`, bound as `bind` says.
pub fn tag_of(key: &[u8; 16], bind: GuardBind, at: &Addressing, datagram: &[u8]) -> [u8; TAG_LEN] {
    let mut head = [0u8; TAG_HEAD_LEN];
    let n = datagram.len().min(TAG_HEAD_LEN);
    head[..n].copy_from_slice(&datagram[..n]);
    let dir = if at.to_server {
        DIR_TO_SERVER
    } else {
        DIR_TO_CLIENT
    };
    let (ctx, addrs) = match bind {
        GuardBind::None => (tag_context(BIND_NONE, dir, 0, 0, 0), TagAddrs::None),
        GuardBind::Port => (
            tag_context(BIND_PORT, dir, at.server_port(), 0, 0),
            TagAddrs::None,
        ),
        GuardBind::FourTuple => {
            let (v, addrs) = match (at.src.ip(), at.dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => (4, TagAddrs::V4(s.octets(), d.octets())),
                (s, d) => (6, TagAddrs::V6(v6_octets(s), v6_octets(d))),
            };
            (
                tag_context(BIND_4TUPLE, dir, at.src.port(), at.dst.port(), v),
                addrs,
            )
        }
    };
    guard_tag(key, &head, ctx, addrs).to_le_bytes()
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Derives the guard key `gkey` from the `transport.kcp.key` string (100 000 PBKDF2 iterations).
pub fn derive_gkey(key: &str) -> [u8; 32] {
    let mut gkey = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(key.as_bytes(), b"paqet_guard", 100_000, &mut gkey);
    gkey
}

/// The tag key from `gkey`.
pub fn derive_tag_key(gkey: &[u8; 32]) -> [u8; 16] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(gkey).expect("HMAC takes any key length");
    mac.update(b"paqet-dp guard tag v1");
    let full = mac.finalize().into_bytes();
    let mut k = [0u8; 16];
    k.copy_from_slice(&full[..16]);
    k
}

/// Guard state: the derived keys and, for the cookie format, the cookies of the current windows
/// (recomputed when the window moves).
#[derive(Clone)]
pub struct Guard {
    cfg: GuardConfig,
    gkey: [u8; 32],
    tag_key: [u8; 16],
    /// Window the cache was built for, and cookies for windows `cached_win - i`, `i = 0..=skew`.
    cached_win: Option<u64>,
    cookies: Vec<[u8; 8]>,
}

impl Guard {
    /// Derives the guard key from the `transport.kcp.key` string (100 000 PBKDF2 iterations: call once).
    pub fn new(cfg: GuardConfig, key: &str) -> Self {
        Self::with_derived(cfg, derive_gkey(key))
    }

    /// A guard from an already derived key (tests).
    pub fn with_derived(cfg: GuardConfig, gkey: [u8; 32]) -> Self {
        Guard {
            tag_key: derive_tag_key(&gkey),
            cfg,
            gkey,
            cached_win: None,
            cookies: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// The tag format's key (what the XDP program gets).
    pub fn tag_key(&self) -> [u8; 16] {
        self.tag_key
    }

    /// Bytes of the prefix in front of every datagram.
    pub fn prefix_len(&self) -> usize {
        match self.cfg.format {
            GuardFormat::Tag => GUARD_TAG_LEN,
            GuardFormat::Cookie => GUARD_LEN,
        }
    }

    fn cookie(&self, win: u64) -> [u8; 8] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.gkey).expect("HMAC takes any key length");
        mac.update(&self.cfg.magic);
        mac.update(&win.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut c = [0u8; 8];
        c.copy_from_slice(&full[..8]);
        c
    }

    fn refresh(&mut self, unix_secs: u64) {
        let win = unix_secs / self.cfg.window_secs.max(1);
        if self.cached_win == Some(win) {
            return;
        }
        self.cookies.clear();
        for i in 0..=self.cfg.skew {
            match win.checked_sub(i) {
                Some(w) => {
                    let c = self.cookie(w);
                    self.cookies.push(c);
                }
                None => break,
            }
        }
        self.cached_win = Some(win);
    }

    /// Cookie format: writes the 12-byte prefix for "now" into `out[..GUARD_LEN]` (also what the XDP
    /// program's cookie table is filled with).
    pub fn write_cookie(&mut self, unix_secs: u64, out: &mut [u8]) {
        self.refresh(unix_secs);
        out[..4].copy_from_slice(&self.cfg.magic);
        out[4..GUARD_LEN].copy_from_slice(&self.cookies[0]);
    }

    /// Writes the prefix of `datagram` (the kcp-go datagram that follows it) sent with addressing `at`
    /// into `out[..self.prefix_len()]`.
    pub fn write_prefix(
        &mut self,
        unix_secs: u64,
        at: &Addressing,
        datagram: &[u8],
        out: &mut [u8],
    ) {
        match self.cfg.format {
            GuardFormat::Tag => out[..GUARD_TAG_LEN].copy_from_slice(&tag_of(
                &self.tag_key,
                self.cfg.bind,
                at,
                datagram,
            )),
            GuardFormat::Cookie => self.write_cookie(unix_secs, out),
        }
    }

    /// True if `payload` (prefix and datagram) received with addressing `at` starts with a valid
    /// prefix: the tag format needs a whole 16-byte datagram head behind the tag; the cookie format
    /// accepts the cookies of "now" and up to `skew` windows back.
    pub fn check(&mut self, unix_secs: u64, at: &Addressing, payload: &[u8]) -> bool {
        match self.cfg.format {
            GuardFormat::Tag => {
                if payload.len() < GUARD_TAG_LEN + TAG_HEAD_LEN {
                    return false;
                }
                let want = tag_of(&self.tag_key, self.cfg.bind, at, &payload[GUARD_TAG_LEN..]);
                let mut got = [0u8; GUARD_TAG_LEN];
                got.copy_from_slice(&payload[..GUARD_TAG_LEN]);
                // One word comparison: no early exit on the first differing byte.
                u64::from_ne_bytes(got) == u64::from_ne_bytes(want)
            }
            GuardFormat::Cookie => {
                if payload.len() < GUARD_LEN || payload[..4] != self.cfg.magic {
                    return false;
                }
                self.refresh(unix_secs);
                let got = &payload[4..GUARD_LEN];
                self.cookies.iter().any(|c| c[..] == *got)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_guard(skew: u64) -> Guard {
        Guard::with_derived(GuardConfig::cookie(*b"PQT1", 30, skew), [7u8; 32])
    }

    fn at(src: &str, dst: &str, to_server: bool) -> Addressing {
        Addressing {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            to_server,
        }
    }

    fn c2s() -> Addressing {
        at("10.0.0.1:40000", "10.0.0.2:9999", true)
    }

    #[test]
    fn cookie_prefix_round_trips_and_rejects_tampering() {
        let mut g = cookie_guard(1);
        let mut p = [0u8; GUARD_LEN + 4];
        g.write_prefix(1_000_000, &c2s(), &[], &mut p);
        assert_eq!(&p[..4], b"PQT1");
        assert_eq!(g.prefix_len(), GUARD_LEN);
        assert!(g.check(1_000_000, &c2s(), &p));
        for i in 0..GUARD_LEN {
            let mut q = p;
            q[i] ^= 0x01;
            assert!(!g.check(1_000_000, &c2s(), &q), "flipped byte {i} accepted");
        }
        assert!(!g.check(1_000_000, &c2s(), &p[..GUARD_LEN - 1]));
    }

    #[test]
    fn cookie_skew_accepts_previous_window_only() {
        let mut sender = cookie_guard(1);
        let mut p = [0u8; GUARD_LEN];
        sender.write_cookie(300, &mut p); // window 10
        let mut strict = cookie_guard(0);
        let mut lenient = cookie_guard(1);
        assert!(lenient.check(330, &c2s(), &p)); // window 11, skew 1
        assert!(!strict.check(330, &c2s(), &p));
        assert!(!lenient.check(360, &c2s(), &p)); // window 12: too old
        let mut q = [0u8; GUARD_LEN];
        sender.write_cookie(330, &mut q);
        assert_ne!(p, q, "cookies depend on the window");
    }

    #[test]
    fn key_derivation_depends_on_key() {
        let cfg = GuardConfig::tag(GuardBind::Port);
        let mut a = Guard::new(cfg.clone(), "key-a");
        let mut b = Guard::new(cfg, "key-b");
        let d = [0x5au8; 40];
        let mut p = [0u8; 48];
        a.write_prefix(42, &c2s(), &d, &mut p[..8]);
        p[8..].copy_from_slice(&d);
        assert!(a.check(42, &c2s(), &p));
        assert!(!b.check(42, &c2s(), &p));
        assert_ne!(a.tag_key(), b.tag_key());
    }

    /// Known answer: the tag key and tag of a fixed key string and datagram head, computed from the
    /// definition (PBKDF2 → HMAC → SipHash-2-4 over the message laid out by hand) with std's SipHasher
    /// (SipHash-2-4) as the independent implementation.
    #[test]
    fn tag_known_answers_match_an_independent_siphash() {
        #[allow(deprecated)]
        fn std_sip(key: &[u8; 16], msg: &[u8]) -> u64 {
            use std::hash::Hasher;
            let k0 = u64::from_le_bytes(key[..8].try_into().unwrap());
            let k1 = u64::from_le_bytes(key[8..].try_into().unwrap());
            let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
            h.write(msg);
            h.finish()
        }
        let g = Guard::new(GuardConfig::tag(GuardBind::Port), "paqet-dp-e2e-test-key");
        let key = g.tag_key();
        let head: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
        let cases: [(GuardBind, Addressing, Vec<u8>); 5] = [
            (GuardBind::None, c2s(), vec![0, 0, 0, 0, 0, 0, 0, 0]),
            (GuardBind::Port, c2s(), vec![1, 0, 0x27, 0x0f, 0, 0, 0, 0]),
            (
                GuardBind::Port,
                at("10.0.0.2:9999", "10.0.0.1:40000", false),
                vec![1, 1, 0x27, 0x0f, 0, 0, 0, 0],
            ),
            (
                GuardBind::FourTuple,
                c2s(),
                vec![2, 0, 0x9c, 0x40, 0x27, 0x0f, 4, 0, 10, 0, 0, 1, 10, 0, 0, 2],
            ),
            (
                GuardBind::FourTuple,
                at("[fd00::1]:40000", "[fd00::2]:9999", true),
                {
                    let mut m = vec![2, 0, 0x9c, 0x40, 0x27, 0x0f, 6, 0];
                    m.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
                    m.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
                    m
                },
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        for (bind, a, tail) in cases {
            let mut msg = head.to_vec();
            msg.extend_from_slice(&tail);
            let want = std_sip(&key, &msg).to_le_bytes();
            assert_eq!(tag_of(&key, bind, &a, &head), want, "{bind:?} {a:?}");
            assert!(seen.insert(want), "tags of different bindings differ");
        }
    }

    #[test]
    fn tag_round_trips_and_rejects_tampering_and_rebinding() {
        for bind in [GuardBind::Port, GuardBind::FourTuple, GuardBind::None] {
            let mut g = Guard::with_derived(GuardConfig::tag(bind), [9u8; 32]);
            assert_eq!(g.prefix_len(), 8);
            let d: Vec<u8> = (0..40u8).collect();
            let mut p = vec![0u8; 8 + d.len()];
            g.write_prefix(0, &c2s(), &d, &mut p[..8]);
            p[8..].copy_from_slice(&d);
            assert!(g.check(0, &c2s(), &p), "{bind:?}");
            assert!(g.check(1 << 40, &c2s(), &p), "{bind:?}: no time window");
            // Every byte of the tag and of the covered head matters; the rest is the crypto's.
            for i in 0..8 + 16 {
                let mut q = p.clone();
                q[i] ^= 0x80;
                assert!(
                    !g.check(0, &c2s(), &q),
                    "{bind:?}: flipped byte {i} accepted"
                );
            }
            let mut q = p.clone();
            q[30] ^= 1;
            assert!(g.check(0, &c2s(), &q));
            // Too short to carry a head.
            assert!(!g.check(0, &c2s(), &p[..8 + 15]));
            // The other direction never matches (a reflected datagram).
            let back = at("10.0.0.2:9999", "10.0.0.1:40000", false);
            assert!(!g.check(0, &back, &p), "{bind:?}: reflected");
            let natted = at("192.0.2.7:1234", "10.0.0.2:9999", true);
            let other_port = at("10.0.0.1:40000", "10.0.0.2:9998", true);
            match bind {
                GuardBind::Port => {
                    assert!(g.check(0, &natted, &p), "port bind survives NAT");
                    assert!(!g.check(0, &other_port, &p));
                }
                GuardBind::FourTuple => {
                    assert!(!g.check(0, &natted, &p));
                    assert!(!g.check(0, &other_port, &p));
                }
                GuardBind::None => {
                    assert!(g.check(0, &natted, &p));
                    assert!(g.check(0, &other_port, &p));
                }
            }
        }
    }

    #[test]
    fn tags_of_different_datagrams_share_no_bytes_pattern() {
        // No constant bytes: over many random heads every tag byte position takes many values.
        let g = Guard::with_derived(GuardConfig::tag(GuardBind::Port), [3u8; 32]);
        let mut seen = [[false; 256]; 8];
        for n in 0..512u32 {
            let mut head = [0u8; 16];
            head[..4].copy_from_slice(&n.to_le_bytes());
            let t = tag_of(&g.tag_key(), GuardBind::Port, &c2s(), &head);
            for (i, b) in t.iter().enumerate() {
                seen[i][usize::from(*b)] = true;
            }
        }
        for (i, s) in seen.iter().enumerate() {
            assert!(s.iter().filter(|x| **x).count() > 128, "tag byte {i}");
        }
    }
}
