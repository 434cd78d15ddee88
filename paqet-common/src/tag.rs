//! The guard tag (`transport.kcp.guard_format = "tag"`): 8 bytes in front of every kcp-go datagram inside
//! the TCP payload, `tag = SipHash-2-4(k, msg)` written little-endian, where `k` is the 128-bit tag key
//! (derived from the guard key by userspace) and `msg` is, byte by byte:
//!
//! ```text
//!  0..16  the first 16 bytes of the kcp-go datagram that follows the tag (its random nonce with every
//!         block mode but null; zero-padded if the datagram is shorter)
//!  16     binding: 0 none, 1 port, 2 4tuple
//!  17     direction: 0 client → server, 1 server → client
//!  18..20 port bind: the server's tunnel port (the destination port client → server, the source port
//!         server → client); 4tuple: the source port; none: 0 (big-endian)
//!  20..22 4tuple: the destination port; otherwise 0 (big-endian)
//!  22     4tuple: the IP version (4 or 6); otherwise 0
//!  23     0
//!  24..   4tuple only: source address, then destination address (4 + 4 or 16 + 16 bytes)
//! ```
//!
//! so `msg` is 24, 32 or 56 bytes long, always a whole number of 8-byte words, which lets the XDP
//! program hash it in straight-line code (no loop over a length the verifier would have to bound).
//!
//! SipHash-2-4 is implemented here rather than taken from a crate: `siphasher` is not in the lockfile,
//! and the one implementation must run in the eBPF program (no_std, no allocation, every call inlined,
//! fixed-size inputs) and in userspace, so both compute the same tag by construction. The word-level
//! [`SipHash24`] is what both use; [`siphash24`] (any byte length) exists for the known-answer tests
//! against the reference vectors and std's SipHasher.

/// Bytes of the tag in front of the datagram.
pub const TAG_LEN: usize = 8;
/// Bytes of the kcp-go datagram covered by the tag.
pub const TAG_HEAD_LEN: usize = 16;

/// No address binding.
pub const BIND_NONE: u8 = 0;
/// Binds the server's tunnel port.
pub const BIND_PORT: u8 = 1;
/// Binds source and destination addresses and ports.
pub const BIND_4TUPLE: u8 = 2;

/// Direction byte: a datagram sent by the client to the server.
pub const DIR_TO_SERVER: u8 = 0;
/// Direction byte: a datagram sent by the server to the client.
pub const DIR_TO_CLIENT: u8 = 1;

/// SipHash-2-4 over whole little-endian 64-bit words.
#[derive(Clone, Copy, Debug)]
pub struct SipHash24 {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    /// Message bytes absorbed so far.
    len: u64,
}

impl SipHash24 {
    /// A hasher keyed with `k0` (key bytes 0..8, little-endian) and `k1` (bytes 8..16).
    #[inline(always)]
    pub const fn new(k0: u64, k1: u64) -> Self {
        SipHash24 {
            v0: k0 ^ 0x736f_6d65_7073_6575,
            v1: k1 ^ 0x646f_7261_6e64_6f6d,
            v2: k0 ^ 0x6c79_6765_6e65_7261,
            v3: k1 ^ 0x7465_6462_7974_6573,
            len: 0,
        }
    }

    /// A hasher keyed with 16 key bytes.
    #[inline(always)]
    pub const fn with_key(key: &[u8; 16]) -> Self {
        let k0 = u64::from_le_bytes([
            key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
        ]);
        let k1 = u64::from_le_bytes([
            key[8], key[9], key[10], key[11], key[12], key[13], key[14], key[15],
        ]);
        Self::new(k0, k1)
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13);
        self.v1 ^= self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16);
        self.v3 ^= self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21);
        self.v3 ^= self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17);
        self.v1 ^= self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.round();
        self.v0 ^= m;
    }

    /// Absorbs 8 message bytes given as their little-endian word.
    #[inline(always)]
    pub fn word(&mut self, m: u64) {
        self.compress(m);
        self.len += 8;
    }

    /// Absorbs 8 message bytes.
    #[inline(always)]
    pub fn bytes8(&mut self, b: [u8; 8]) {
        self.word(u64::from_le_bytes(b));
    }

    /// Finishes with `tail` (0..=7 further message bytes, `tail_len` of them, packed little-endian).
    #[inline(always)]
    fn finish_tail(mut self, tail: u64, tail_len: u64) -> u64 {
        let b = ((self.len + tail_len) << 56) | tail;
        self.compress(b);
        self.v2 ^= 0xff;
        self.round();
        self.round();
        self.round();
        self.round();
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }

    /// The hash of the words absorbed (a message of a whole number of words).
    #[inline(always)]
    pub fn finish(self) -> u64 {
        self.finish_tail(0, 0)
    }
}

/// SipHash-2-4 of `data` (any length) under `key`.
pub fn siphash24(key: &[u8; 16], data: &[u8]) -> u64 {
    let mut h = SipHash24::with_key(key);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        h.bytes8([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
    let rest = chunks.remainder();
    let mut tail = 0u64;
    let mut i = 0;
    while i < rest.len() {
        tail |= (rest[i] as u64) << (8 * i);
        i += 1;
    }
    h.finish_tail(tail, rest.len() as u64)
}

/// The addresses a 4tuple tag binds (source first, network byte order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagAddrs {
    /// Port or no binding: no address.
    None,
    /// IPv4 source and destination.
    V4([u8; 4], [u8; 4]),
    /// IPv6 source and destination.
    V6([u8; 16], [u8; 16]),
}

/// Message bytes 16..24 (see the module docs).
#[inline(always)]
pub const fn tag_context(bind: u8, dir: u8, port_a: u16, port_b: u16, ip_version: u8) -> [u8; 8] {
    let a = port_a.to_be_bytes();
    let b = port_b.to_be_bytes();
    [bind, dir, a[0], a[1], b[0], b[1], ip_version, 0]
}

/// The tag of a datagram whose first 16 bytes are `head`, with context bytes `ctx`
/// ([`tag_context`]) and, for 4tuple, the addresses.
#[inline(always)]
pub fn guard_tag(key: &[u8; 16], head: &[u8; TAG_HEAD_LEN], ctx: [u8; 8], addrs: TagAddrs) -> u64 {
    let mut h = SipHash24::with_key(key);
    h.bytes8([
        head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
    ]);
    h.bytes8([
        head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
    ]);
    h.bytes8(ctx);
    match addrs {
        TagAddrs::None => {}
        TagAddrs::V4(s, d) => h.bytes8([s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]]),
        TagAddrs::V6(s, d) => {
            h.bytes8([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
            h.bytes8([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
            h.bytes8([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            h.bytes8([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    #[test]
    fn reference_vectors() {
        // The SipHash paper's appendix A (key 00..0f, message 00..0e) and the first entries of the
        // reference implementation's vector table (messages 00..len-1).
        let msg: [u8; 64] = core::array::from_fn(|i| i as u8);
        let want: [(usize, u64); 5] = [
            (0, 0x726f_db47_dd0e_0e31),
            (1, 0x74f8_39c5_93dc_67fd),
            (8, 0x93f5_f579_9a93_2462),
            (15, 0xa129_ca61_49be_45e5),
            (16, 0x3f2a_cc7f_57c2_9bdb),
        ];
        for (len, h) in want {
            assert_eq!(siphash24(&KEY, &msg[..len]), h, "length {len}");
        }
    }

    #[test]
    fn word_api_equals_byte_api() {
        let msg: [u8; 56] = core::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let head: [u8; 16] = msg[..16].try_into().unwrap();
        let ctx: [u8; 8] = msg[16..24].try_into().unwrap();
        assert_eq!(
            guard_tag(&KEY, &head, ctx, TagAddrs::None),
            siphash24(&KEY, &msg[..24])
        );
        let v4 = TagAddrs::V4(
            msg[24..28].try_into().unwrap(),
            msg[28..32].try_into().unwrap(),
        );
        assert_eq!(guard_tag(&KEY, &head, ctx, v4), siphash24(&KEY, &msg[..32]));
        let v6 = TagAddrs::V6(
            msg[24..40].try_into().unwrap(),
            msg[40..56].try_into().unwrap(),
        );
        assert_eq!(guard_tag(&KEY, &head, ctx, v6), siphash24(&KEY, &msg[..56]));
    }

    #[test]
    fn context_layout() {
        assert_eq!(
            tag_context(BIND_4TUPLE, DIR_TO_CLIENT, 0x1234, 0xabcd, 6),
            [2, 1, 0x12, 0x34, 0xab, 0xcd, 6, 0]
        );
        assert_eq!(
            tag_context(BIND_PORT, DIR_TO_SERVER, 9999, 0, 0),
            [1, 0, 0x27, 0x0f, 0, 0, 0, 0]
        );
    }
}
