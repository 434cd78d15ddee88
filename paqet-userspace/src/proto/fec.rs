//! kcp-go (v5.6.72) forward error correction: the sender's encoder and the receiver's decoder, sans-IO.
//!
//! Every `dshard` data packets the encoder emits `pshard` Reed-Solomon parity packets computed over the
//! data packets' `size|kcp` regions, zero-padded to the longest of the group. Sequence ids count every
//! packet (data and parity) and wrap at the largest multiple of `dshard + pshard` below 2^32, so group
//! boundaries stay aligned. Parity is skipped (its sequence ids still consumed) when the gap since the
//! previous data packet is at least the RTO, as kcp-go does: late parity would only duplicate
//! retransmissions.
//!
//! The decoder hands every data packet to KCP at once and keeps the shards of the last
//! [`RX_GROUPS`] groups (kcp-go's `rxFECMulti` × (d+p) shards); as soon as a group holds `dshard` shards
//! and a data shard is missing, it reconstructs the missing ones and delivers their KCP bytes.
//!
//! The Reed-Solomon code is klauspost/reedsolomon's default (Backblaze JavaReedSolomon compatible):
//! over GF(2^8) with polynomial 0x11d, the (d+p)×d Vandermonde matrix times the inverse of its top d×d
//! square, so the code is systematic.
pub use crate::wire::fec::FecError;
use crate::wire::fec::{self as wfec, FecKind, FEC_DATA_HEADER, FEC_HEADER, MAX_SHARD};

/// Groups whose shards the decoder keeps (kcp-go keeps `rxFECMulti = 3` groups' worth of shards).
pub const RX_GROUPS: usize = 3;
/// A group's shards are discarded when its first shard is older than this (kcp-go `fecExpire`).
pub const FEC_EXPIRE_MS: u32 = 60_000;

mod gf {
    //! GF(2^8) arithmetic, polynomial x^8+x^4+x^3+x^2+1 (0x11d), generator 2.
    use std::sync::LazyLock;

    pub struct Tables {
        pub exp: [u8; 512],
        pub log: [u8; 256],
        /// `mul[a][b] = a·b`.
        pub mul: Box<[[u8; 256]; 256]>,
        /// Split-nibble tables: `nib[c][0][x] = c·x`, `nib[c][1][x] = c·(x<<4)` for x < 16.
        pub nib: Box<[[[u8; 16]; 2]; 256]>,
    }

    pub static T: LazyLock<Tables> = LazyLock::new(|| {
        let mut exp = [0u8; 512];
        let mut log = [0u8; 256];
        let mut x: u16 = 1;
        for (i, e) in exp.iter_mut().take(255).enumerate() {
            *e = x as u8;
            log[x as usize] = i as u8;
            x <<= 1;
            if x & 0x100 != 0 {
                x ^= 0x11d;
            }
        }
        for i in 255..512 {
            exp[i] = exp[i - 255];
        }
        let m = |a: u8, b: u8| -> u8 {
            if a == 0 || b == 0 {
                0
            } else {
                exp[log[a as usize] as usize + log[b as usize] as usize]
            }
        };
        let mut mul = Box::new([[0u8; 256]; 256]);
        let mut nib = Box::new([[[0u8; 16]; 2]; 256]);
        for a in 0..256 {
            for b in 0..256 {
                mul[a][b] = m(a as u8, b as u8);
            }
            for x in 0..16 {
                nib[a][0][x] = m(a as u8, x as u8);
                nib[a][1][x] = m(a as u8, (x << 4) as u8);
            }
        }
        Tables { exp, log, mul, nib }
    });

    #[inline]
    pub fn mul(a: u8, b: u8) -> u8 {
        T.mul[a as usize][b as usize]
    }

    /// Multiplicative inverse; `a` must be non-zero.
    #[inline]
    pub fn inv(a: u8) -> u8 {
        debug_assert!(a != 0);
        T.exp[255 - T.log[a as usize] as usize]
    }

    /// `a^n` with `0^0 = 1` (klauspost `galExp`).
    pub fn pow(a: u8, n: usize) -> u8 {
        if n == 0 {
            1
        } else if a == 0 {
            0
        } else {
            T.exp[(T.log[a as usize] as usize * n) % 255]
        }
    }

    /// Inverts the `d×d` row-major matrix `m` into `out` using `work` (`d×2d`) as scratch.
    /// Returns false when `m` is singular.
    pub fn invert(m: &[u8], d: usize, out: &mut [u8], work: &mut [u8]) -> bool {
        let w = 2 * d;
        for r in 0..d {
            let row = &mut work[r * w..(r + 1) * w];
            row[..d].copy_from_slice(&m[r * d..(r + 1) * d]);
            row[d..].fill(0);
            row[d + r] = 1;
        }
        for c in 0..d {
            let Some(p) = (c..d).find(|&r| work[r * w + c] != 0) else {
                return false;
            };
            if p != c {
                for k in 0..w {
                    work.swap(p * w + k, c * w + k);
                }
            }
            let s = inv(work[c * w + c]);
            for k in 0..w {
                work[c * w + k] = mul(work[c * w + k], s);
            }
            for r in 0..d {
                let f = work[r * w + c];
                if r != c && f != 0 {
                    for k in 0..w {
                        let v = mul(f, work[c * w + k]);
                        work[r * w + k] ^= v;
                    }
                }
            }
        }
        for r in 0..d {
            out[r * d..(r + 1) * d].copy_from_slice(&work[r * w + d..(r + 1) * w]);
        }
        true
    }

    /// `dst = c·src` (`add == false`) or `dst ^= c·src` (`add == true`); equal lengths.
    #[inline]
    pub fn mul_slice(c: u8, src: &[u8], dst: &mut [u8], add: bool, simd: bool) {
        debug_assert_eq!(src.len(), dst.len());
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when AVX2 was detected at run time.
            done = unsafe { x86::mul_slice_avx2(&T.nib[c as usize], src, dst, add) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        let row = &T.mul[c as usize];
        let (src, dst) = (&src[done..], &mut dst[done..]);
        if add {
            for (d, s) in dst.iter_mut().zip(src) {
                *d ^= row[*s as usize];
            }
        } else {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = row[*s as usize];
            }
        }
    }

    /// Whether the AVX2 kernel can be used on this CPU.
    pub fn simd_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// Split-nibble multiply of the largest multiple of 32 bytes; returns how many bytes it did.
        #[target_feature(enable = "avx2")]
        pub unsafe fn mul_slice_avx2(
            nib: &[[u8; 16]; 2],
            src: &[u8],
            dst: &mut [u8],
            add: bool,
        ) -> usize {
            let n = src.len().min(dst.len()) / 32 * 32;
            let lo =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(nib[0].as_ptr() as *const __m128i));
            let hi =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(nib[1].as_ptr() as *const __m128i));
            let mask = _mm256_set1_epi8(0x0f);
            let mut i = 0;
            while i < n {
                let s = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                let l = _mm256_and_si256(s, mask);
                let h = _mm256_and_si256(_mm256_srli_epi64(s, 4), mask);
                let mut p =
                    _mm256_xor_si256(_mm256_shuffle_epi8(lo, l), _mm256_shuffle_epi8(hi, h));
                let dp = dst.as_mut_ptr().add(i) as *mut __m256i;
                if add {
                    p = _mm256_xor_si256(p, _mm256_loadu_si256(dp));
                }
                _mm256_storeu_si256(dp, p);
                i += 32;
            }
            n
        }
    }
}

/// Systematic Reed-Solomon code matching klauspost/reedsolomon's default matrix.
struct ReedSolomon {
    d: usize,
    p: usize,
    /// `(d+p)×d` row-major encoding matrix; its top `d` rows are the identity.
    matrix: Vec<u8>,
    simd: bool,
}

impl ReedSolomon {
    fn new(d: usize, p: usize) -> Result<Self, FecError> {
        if d == 0 || p == 0 || d + p > 256 {
            return Err(FecError::BadShards {
                dshard: d,
                pshard: p,
            });
        }
        let n = d + p;
        let mut vm = vec![0u8; n * d];
        for r in 0..n {
            for c in 0..d {
                vm[r * d + c] = gf::pow(r as u8, c);
            }
        }
        let mut top_inv = vec![0u8; d * d];
        let mut work = vec![0u8; d * 2 * d];
        if !gf::invert(&vm[..d * d], d, &mut top_inv, &mut work) {
            return Err(FecError::BadShards {
                dshard: d,
                pshard: p,
            });
        }
        let mut matrix = vec![0u8; n * d];
        for r in 0..n {
            for c in 0..d {
                let mut acc = 0u8;
                for k in 0..d {
                    acc ^= gf::mul(vm[r * d + k], top_inv[k * d + c]);
                }
                matrix[r * d + c] = acc;
            }
        }
        Ok(ReedSolomon {
            d,
            p,
            matrix,
            simd: gf::simd_available(),
        })
    }

    /// Computes the parity shards in place. Shard `i` is `buf[i*stride + off ..][..len]`, data shards
    /// `0..d`, parity shards `d..d+p`.
    fn encode(&self, buf: &mut [u8], stride: usize, off: usize, len: usize) {
        for i in 0..self.p {
            let (lo, hi) = buf.split_at_mut((self.d + i) * stride);
            let dst = &mut hi[off..off + len];
            let row = &self.matrix[(self.d + i) * self.d..(self.d + i + 1) * self.d];
            for (j, &c) in row.iter().enumerate() {
                let src = &lo[j * stride + off..j * stride + off + len];
                gf::mul_slice(c, src, dst, j != 0, self.simd);
            }
        }
    }
}

/// The sending half: adds FEC headers to data packets and produces the parity packets.
pub struct FecEncoder {
    d: usize,
    p: usize,
    headroom: usize,
    /// Sequence ids wrap here (a multiple of d+p), as kcp-go's `paws`.
    paws: u32,
    next: u32,
    count: usize,
    max_len: usize,
    lens: Vec<usize>,
    /// `d+p` buffers of `stride` bytes: headroom | seqid | type | shard.
    stride: usize,
    cache: Vec<u8>,
    last_ms: Option<u32>,
    rs: ReedSolomon,
}

impl FecEncoder {
    /// An encoder for `dshard` data + `pshard` parity shards; parity buffers keep `headroom` free bytes
    /// in front for the crypto header.
    pub fn new(dshard: usize, pshard: usize, headroom: usize) -> Result<Self, FecError> {
        let rs = ReedSolomon::new(dshard, pshard)?;
        let n = dshard + pshard;
        let stride = headroom + FEC_HEADER + MAX_SHARD;
        Ok(FecEncoder {
            d: dshard,
            p: pshard,
            headroom,
            paws: u32::MAX / n as u32 * n as u32,
            next: 0,
            count: 0,
            max_len: 0,
            lens: vec![0; dshard],
            stride,
            cache: vec![0; n * stride],
            last_ms: None,
            rs,
        })
    }

    /// The sequence id the next packet will get.
    pub fn next_seqid(&self) -> u32 {
        self.next
    }

    fn take_seqid(&mut self) -> u32 {
        let s = self.next;
        self.next = (self.next + 1) % self.paws;
        s
    }

    /// `pkt[headroom .. headroom+8]` is free space for the FEC data header, the KCP bytes follow at
    /// `pkt[headroom+8 .. headroom+8+kcp_len]`. Fills the header in place. When this packet completes a
    /// group, calls `parity(buf)` pshard times with buffers whose `buf[headroom..]` holds
    /// `seqid|0xF2|parity` and whose first `headroom` bytes are free for the caller's crypto header.
    /// Returns the length of pkt used (headroom+8+kcp_len).
    ///
    /// # Panics
    /// If `pkt` is shorter than `headroom + 8 + kcp_len` or `kcp_len + 2 > MAX_SHARD` (caller bugs).
    pub fn encode(
        &mut self,
        pkt: &mut [u8],
        kcp_len: usize,
        now_ms: u32,
        rto_ms: u32,
        parity: &mut dyn FnMut(&mut [u8]),
    ) -> usize {
        let hr = self.headroom;
        let total = hr + FEC_DATA_HEADER + kcp_len;
        assert!(
            pkt.len() >= total,
            "FEC encode: packet buffer {} < {total}",
            pkt.len()
        );
        let shard_len = kcp_len + 2;
        assert!(
            shard_len <= MAX_SHARD,
            "FEC encode: KCP payload {kcp_len} exceeds {}",
            MAX_SHARD - 2
        );

        let seqid = self.take_seqid();
        wfec::write_header(&mut pkt[hr..], seqid, FecKind::Data);
        pkt[hr + FEC_HEADER..hr + FEC_DATA_HEADER]
            .copy_from_slice(&(shard_len as u16).to_le_bytes());

        let off = hr + FEC_HEADER;
        let i = self.count;
        self.cache[i * self.stride + off..][..shard_len]
            .copy_from_slice(&pkt[off..off + shard_len]);
        self.lens[i] = shard_len;
        self.max_len = self.max_len.max(shard_len);
        self.count += 1;

        if self.count == self.d {
            let continuous = self
                .last_ms
                .is_some_and(|last| now_ms.wrapping_sub(last) < rto_ms);
            if continuous {
                let max = self.max_len;
                for k in 0..self.d {
                    self.cache[k * self.stride + off + self.lens[k]..k * self.stride + off + max]
                        .fill(0);
                }
                self.rs.encode(&mut self.cache, self.stride, off, max);
                for k in self.d..self.d + self.p {
                    let seqid = self.take_seqid();
                    let buf = &mut self.cache[k * self.stride..k * self.stride + off + max];
                    wfec::write_header(&mut buf[hr..], seqid, FecKind::Parity);
                    parity(buf);
                }
            } else {
                tracing::trace!(seqid, "FEC parity skipped: data not continuous within RTO");
                self.next = ((self.next as u64 + self.p as u64) % self.paws as u64) as u32;
            }
            self.count = 0;
            self.max_len = 0;
        }
        self.last_ms = Some(now_ms);
        total
    }
}

/// Decoder counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecStats {
    /// Data shards recovered from parity and delivered.
    pub recovered: u64,
    /// Parity packets received.
    pub parity_seen: u64,
    /// Data packets received.
    pub data_seen: u64,
    /// Shards that arrived for a group already pushed out of the receive window.
    pub dropped_too_old: u64,
    /// Bodies with a malformed FEC header or size.
    pub malformed: u64,
    /// Groups evicted while data shards were still missing and unrecoverable.
    pub groups_lost: u64,
    /// Reconstructed shards whose `size` field was invalid (not delivered).
    pub bad_recovered: u64,
    /// Shards whose type does not match their position in the group (data in a parity slot or vice
    /// versa: the peer uses other shard counts); data is still delivered, the shard is not used.
    pub misplaced: u64,
}

/// Receive state of one group.
struct Group {
    used: bool,
    done: bool,
    /// Sequence id of shard 0.
    base: u32,
    /// Time the first shard arrived.
    ts: u32,
    count: usize,
    data_count: usize,
    max_len: usize,
    present: Vec<bool>,
    lens: Vec<usize>,
    /// `n` shards of `MAX_SHARD` bytes, allocated on first use.
    buf: Vec<u8>,
}

impl Group {
    fn new(n: usize) -> Self {
        Group {
            used: false,
            done: false,
            base: 0,
            ts: 0,
            count: 0,
            data_count: 0,
            max_len: 0,
            present: vec![false; n],
            lens: vec![0; n],
            buf: Vec::new(),
        }
    }

    fn reset(&mut self, base: u32, now: u32) {
        self.used = true;
        self.done = false;
        self.base = base;
        self.ts = now;
        self.count = 0;
        self.data_count = 0;
        self.max_len = 0;
        self.present.fill(false);
        if self.buf.is_empty() {
            self.buf = vec![0; self.present.len() * MAX_SHARD];
        }
    }
}

/// The receiving half: delivers data packets and reconstructs lost ones.
pub struct FecDecoder {
    d: usize,
    n: usize,
    rs: ReedSolomon,
    groups: Vec<Group>,
    stats: FecStats,
    rows: Vec<usize>,
    sub: Vec<u8>,
    inv: Vec<u8>,
    work: Vec<u8>,
    out: Vec<u8>,
}

impl FecDecoder {
    pub fn new(dshard: usize, pshard: usize) -> Result<Self, FecError> {
        let rs = ReedSolomon::new(dshard, pshard)?;
        let n = dshard + pshard;
        Ok(FecDecoder {
            d: dshard,
            n,
            rs,
            groups: (0..RX_GROUPS).map(|_| Group::new(n)).collect(),
            stats: FecStats::default(),
            rows: Vec::with_capacity(dshard),
            sub: vec![0; dshard * dshard],
            inv: vec![0; dshard * dshard],
            work: vec![0; dshard * 2 * dshard],
            out: vec![0; MAX_SHARD],
        })
    }

    pub fn stats(&self) -> FecStats {
        self.stats
    }

    /// Feed one decrypted body; calls `deliver(kcp_bytes)` for the data packet itself and for any
    /// recovered ones. A body without an FEC header (see [`wfec::is_fec`]) is raw KCP and is delivered
    /// unchanged, as kcp-go does.
    pub fn decode(
        &mut self,
        body: &[u8],
        now_ms: u32,
        deliver: &mut dyn FnMut(&[u8]),
    ) -> Result<(), FecError> {
        if !wfec::is_fec(body) {
            deliver(body);
            return Ok(());
        }
        let pkt = match wfec::parse(body) {
            Ok(p) => p,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(error = %e, "malformed FEC packet");
                return Err(e);
            }
        };
        let is_data = pkt.kind == FecKind::Data;
        if is_data {
            self.stats.data_seen += 1;
            deliver(pkt.payload);
        } else {
            self.stats.parity_seen += 1;
        }

        let idx = (pkt.seqid % self.n as u32) as usize;
        if (idx < self.d) != is_data {
            self.stats.misplaced += 1;
            return Ok(());
        }
        let base = pkt.seqid - idx as u32;
        let slot = ((base / self.n as u32) as usize) % RX_GROUPS;
        let d = self.d;
        let g = &mut self.groups[slot];
        if !g.used || (now_ms.wrapping_sub(g.ts) as i32) > FEC_EXPIRE_MS as i32 {
            g.reset(base, now_ms);
        } else if g.base != base {
            if (base.wrapping_sub(g.base) as i32) > 0 {
                if !g.done && g.data_count < d {
                    self.stats.groups_lost += 1;
                }
                g.reset(base, now_ms);
            } else {
                self.stats.dropped_too_old += 1;
                return Ok(());
            }
        }
        if g.done || g.present[idx] {
            return Ok(());
        }
        let shard = pkt.shard;
        g.buf[idx * MAX_SHARD..idx * MAX_SHARD + shard.len()].copy_from_slice(shard);
        g.present[idx] = true;
        g.lens[idx] = shard.len();
        g.max_len = g.max_len.max(shard.len());
        g.count += 1;
        if is_data {
            g.data_count += 1;
        }
        if g.count >= d {
            g.done = true;
            if g.data_count < d {
                self.recover(slot, deliver);
            }
        }
        Ok(())
    }

    /// Reconstructs the missing data shards of the group in `slot` (which holds ≥ d shards).
    fn recover(&mut self, slot: usize, deliver: &mut dyn FnMut(&[u8])) {
        let (d, n) = (self.d, self.n);
        let g = &mut self.groups[slot];
        let max = g.max_len;
        self.rows.clear();
        self.rows.extend((0..n).filter(|&i| g.present[i]).take(d));
        for (r, &row) in self.rows.iter().enumerate() {
            self.sub[r * d..(r + 1) * d].copy_from_slice(&self.rs.matrix[row * d..(row + 1) * d]);
            g.buf[row * MAX_SHARD + g.lens[row]..row * MAX_SHARD + max].fill(0);
        }
        if !gf::invert(&self.sub, d, &mut self.inv, &mut self.work) {
            // Cannot happen for an MDS code; kept as a typed outcome rather than a panic.
            tracing::warn!("FEC recovery matrix is singular");
            return;
        }
        for k in 0..d {
            if g.present[k] {
                continue;
            }
            let out = &mut self.out[..max];
            for (j, &row) in self.rows.iter().enumerate() {
                let src = &g.buf[row * MAX_SHARD..row * MAX_SHARD + max];
                gf::mul_slice(self.inv[k * d + j], src, out, j != 0, self.rs.simd);
            }
            let size = if max >= 2 {
                u16::from_le_bytes([out[0], out[1]]) as usize
            } else {
                0
            };
            if (2..=max).contains(&size) {
                self.stats.recovered += 1;
                deliver(&out[2..size]);
            } else {
                self.stats.bad_recovered += 1;
                tracing::debug!(
                    size,
                    shard_len = max,
                    "recovered FEC shard has an invalid size"
                );
            }
        }
    }
}

/// Fuzz entry point: feeds `data` as a sequence of bodies (each prefixed by a one-byte length, scaled
/// up to cover full-size packets) to a 10/3 decoder. Must never panic.
pub fn fuzz_decode(data: &[u8]) {
    let Ok(mut dec) = FecDecoder::new(10, 3) else {
        return;
    };
    let mut rest = data;
    let mut now = 0u32;
    let mut sink = 0usize;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize * 7).min(tail.len());
        let (body, tail) = tail.split_at(len);
        let _ = dec.decode(body, now, &mut |kcp| sink = sink.wrapping_add(kcp.len()));
        now = now.wrapping_add(len as u32 * 997);
        rest = tail;
    }
    std::hint::black_box(sink);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::pcapfile::PcapFile;

    const DKEY: &str = "e5fcaebb5f76a11e829bff7c3cd4353be32958019d1be0055d4924f6c702dca9";
    const IV: &str = "a7734f9c12ac1b01a415f2c1fc78e66b";

    /// The decrypted, CRC-checked bodies of fec.pcap: (from server, body).
    fn capture_bodies() -> Vec<(bool, Vec<u8>)> {
        use cipher::{AsyncStreamCipher, KeyIvInit};
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/testdata/upstream-alpha21/fec.pcap"
        );
        let bytes = std::fs::read(path).expect("fec.pcap present");
        let file = PcapFile::parse(&bytes).expect("fec.pcap parses");
        let key = hex::decode(DKEY).unwrap();
        let iv = hex::decode(IV).unwrap();
        file.records
            .iter()
            .map(|r| {
                let from_server = u16::from_be_bytes([r.data[34], r.data[35]]) == 9999;
                let mut buf = r.data[66..].to_vec();
                cfb_mode::Decryptor::<aes::Aes256>::new_from_slices(&key, &iv)
                    .unwrap()
                    .decrypt(&mut buf);
                let body = buf[20..].to_vec();
                let crc = u32::from_le_bytes([buf[16], buf[17], buf[18], buf[19]]);
                assert_eq!(crc, crc32fast::hash(&body), "CRC of a capture datagram");
                (from_server, body)
            })
            .collect()
    }

    /// Encodes `kcp` with `enc` (headroom `hr`); returns the data body and the parity bodies produced.
    fn enc_one(
        enc: &mut FecEncoder,
        hr: usize,
        kcp: &[u8],
        now: u32,
        rto: u32,
    ) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut pkt = vec![0xEE; hr + FEC_DATA_HEADER + kcp.len()];
        pkt[hr + FEC_DATA_HEADER..].copy_from_slice(kcp);
        let mut par = Vec::new();
        let used = enc.encode(&mut pkt, kcp.len(), now, rto, &mut |b: &mut [u8]| {
            assert!(b.len() > hr + FEC_HEADER);
            par.push(b[hr..].to_vec())
        });
        assert_eq!(used, pkt.len());
        (pkt[hr..].to_vec(), par)
    }

    fn kcp_of(body: &[u8]) -> Vec<u8> {
        wfec::parse(body).unwrap().payload.to_vec()
    }

    #[test]
    fn matrix_is_systematic_and_capture_parity_matches() {
        let rs = ReedSolomon::new(10, 3).unwrap();
        for r in 0..10 {
            for c in 0..10 {
                assert_eq!(
                    rs.matrix[r * 10 + c],
                    (r == c) as u8,
                    "top of the matrix is the identity"
                );
            }
        }
        // Re-encode the server's data packets: every byte of every data and parity body must match.
        let server: Vec<Vec<u8>> = capture_bodies()
            .into_iter()
            .filter(|(s, _)| *s)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(server.len(), 79);
        let mut enc = FecEncoder::new(10, 3, 20).unwrap();
        let mut produced = Vec::new();
        for body in &server {
            if wfec::parse(body).unwrap().kind == FecKind::Data {
                let (data, par) = enc_one(&mut enc, 20, &kcp_of(body), 1000, 200);
                produced.push(data);
                produced.extend(par);
            }
        }
        let parity_count = produced.iter().filter(|b| b[4] == 0xf2).count();
        assert_eq!(parity_count, 18);
        assert_eq!(produced.len(), server.len());
        for (i, (mine, theirs)) in produced.iter().zip(&server).enumerate() {
            assert_eq!(
                mine,
                theirs,
                "body {i} (seqid {}) differs",
                wfec::parse(theirs).unwrap().seqid
            );
        }
    }

    /// The complete (13-shard) server groups of the capture, shards in seqid order.
    fn complete_groups() -> Vec<Vec<Vec<u8>>> {
        let mut groups: std::collections::BTreeMap<u32, Vec<Vec<u8>>> = Default::default();
        for (s, b) in capture_bodies() {
            if s {
                groups
                    .entry(wfec::parse(&b).unwrap().seqid / 13)
                    .or_default()
                    .push(b);
            }
        }
        let full: Vec<_> = groups.into_values().filter(|g| g.len() == 13).collect();
        assert_eq!(full.len(), 6);
        full
    }

    /// Feeds `shards` (skipping indices in `drop`) to a fresh 10/3 decoder; returns delivered KCP bytes.
    fn feed(shards: &[Vec<u8>], drop: &[usize]) -> (Vec<Vec<u8>>, FecStats) {
        let mut dec = FecDecoder::new(10, 3).unwrap();
        let mut got = Vec::new();
        for (i, b) in shards.iter().enumerate() {
            if !drop.contains(&i) {
                dec.decode(b, 5, &mut |k| got.push(k.to_vec())).unwrap();
            }
        }
        (got, dec.stats())
    }

    #[test]
    fn capture_groups_recover_any_three_lost_shards() {
        for group in complete_groups() {
            let mut want: Vec<Vec<u8>> = group[..10].iter().map(|b| kcp_of(b)).collect();
            want.sort();
            let (mut got, st) = feed(&group, &[]);
            got.sort();
            assert_eq!(got, want);
            assert_eq!(st.recovered, 0);
            for a in 0..13 {
                for b in a..13 {
                    for c in b..13 {
                        let mut drop = vec![a, b, c];
                        drop.dedup();
                        let lost_data = drop.iter().filter(|&&i| i < 10).count() as u64;
                        let (mut got, st) = feed(&group, &drop);
                        got.sort();
                        assert_eq!(got, want, "group with shards {drop:?} dropped");
                        assert_eq!(st.recovered, lost_data, "recovered count for {drop:?}");
                    }
                }
            }
            // four lost data shards cannot be recovered, and nothing bogus is delivered
            let (got, st) = feed(&group, &[0, 3, 5, 9]);
            assert_eq!(got.len(), 6);
            assert!(got.iter().all(|g| want.contains(g)));
            assert_eq!(st.recovered, 0);
        }
    }

    #[test]
    fn whole_capture_decodes_without_recovery() {
        let mut dec = FecDecoder::new(10, 3).unwrap();
        let mut n = 0;
        for (s, b) in capture_bodies() {
            if s {
                dec.decode(&b, 0, &mut |_| n += 1).unwrap();
            }
        }
        let st = dec.stats();
        assert_eq!(
            (n, st.data_seen, st.parity_seen, st.recovered, st.malformed),
            (61, 61, 18, 0, 0)
        );
    }

    #[test]
    fn simd_and_scalar_kernels_agree() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let src: Vec<u8> = (0..1333).map(|_| rng.gen()).collect();
        for c in [0u8, 1, 2, 0x1d, 0x8e, 0xff] {
            for add in [false, true] {
                let init: Vec<u8> = (0..src.len()).map(|_| rng.gen()).collect();
                let (mut a, mut b) = (init.clone(), init.clone());
                gf::mul_slice(c, &src, &mut a, add, false);
                gf::mul_slice(c, &src, &mut b, add, gf::simd_available());
                let want: Vec<u8> = src
                    .iter()
                    .zip(&init)
                    .map(|(&s, &i)| gf::mul(c, s) ^ if add { i } else { 0 })
                    .collect();
                assert_eq!(a, want);
                assert_eq!(b, want);
            }
        }
        assert_eq!(gf::mul(gf::inv(0x53), 0x53), 1);
    }

    #[test]
    fn parity_skipped_after_rto_gap_but_seqids_advance() {
        let mut enc = FecEncoder::new(2, 1, 0).unwrap();
        // first group: the very first packet has no predecessor, but the check is on the 2nd one
        let (_, p) = enc_one(&mut enc, 0, b"a", 0, 100);
        assert!(p.is_empty());
        let (_, p) = enc_one(&mut enc, 0, b"b", 50, 100);
        assert_eq!(p.len(), 1);
        assert_eq!(&p[0][..6], &[2, 0, 0, 0, 0xf2, 0]);
        // second group: gap of exactly the RTO before its last packet -> no parity, seqid 5 skipped
        enc_one(&mut enc, 0, b"c", 60, 100);
        let (d, p) = enc_one(&mut enc, 0, b"d", 160, 100);
        assert!(p.is_empty());
        assert_eq!(&d[..4], &[4, 0, 0, 0]);
        let (d, _) = enc_one(&mut enc, 0, b"e", 161, 100);
        assert_eq!(&d[..4], &[6, 0, 0, 0], "seqid skipped the missing parity");
    }

    #[test]
    fn seqid_wraps_at_a_multiple_of_the_group_size() {
        let mut enc = FecEncoder::new(10, 3, 0).unwrap();
        let paws = u32::MAX / 13 * 13;
        enc.next = paws - 13;
        for i in 0..10 {
            let (d, p) = enc_one(&mut enc, 0, &[i; 30], i as u32, 1000);
            assert_eq!(
                u32::from_le_bytes(d[..4].try_into().unwrap()),
                paws - 13 + i as u32
            );
            if i == 9 {
                let ids: Vec<u32> = p
                    .iter()
                    .map(|b| u32::from_le_bytes(b[..4].try_into().unwrap()))
                    .collect();
                assert_eq!(ids, vec![paws - 3, paws - 2, paws - 1]);
            }
        }
        assert_eq!(enc.next_seqid(), 0);
        // the decoder follows the wrap: the group after the wrap is newer, not "too old"
        let mut dec = FecDecoder::new(10, 3).unwrap();
        let mut enc2 = FecEncoder::new(10, 3, 0).unwrap();
        enc2.next = paws - 13;
        let mut n = 0;
        for g in 0..2u8 {
            for i in 0..10u8 {
                let (d, par) = enc_one(&mut enc2, 0, &[g, i, 1, 2], 0, 1000);
                if i != 4 {
                    dec.decode(&d, 0, &mut |_| n += 1).unwrap();
                }
                for b in par {
                    dec.decode(&b, 0, &mut |_| n += 1).unwrap();
                }
            }
        }
        assert_eq!(n, 20);
        assert_eq!(dec.stats().recovered, 2);
        assert_eq!(dec.stats().dropped_too_old, 0);
    }

    /// Runs `groups` groups of random KCP payloads through an encoder and a decoder, losing `loss(group)`
    /// random shards of each group and reordering within a group; returns (sent, delivered, stats).
    fn random_run(
        d: usize,
        p: usize,
        groups: usize,
        seed: u64,
        loss: &dyn Fn(usize) -> usize,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, FecStats) {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut enc = FecEncoder::new(d, p, 20).unwrap();
        let mut dec = FecDecoder::new(d, p).unwrap();
        let (mut sent, mut got) = (Vec::new(), Vec::new());
        for g in 0..groups {
            let mut wire = Vec::new();
            for _ in 0..d {
                let len = rng.gen_range(1..=MAX_SHARD - 2);
                let kcp: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let (data, par) = enc_one(&mut enc, 20, &kcp, g as u32, 1000);
                sent.push(kcp);
                wire.push(data);
                wire.extend(par);
            }
            // with d = 1 the very first packet has no predecessor to prove continuity: no parity
            assert!(
                wire.len() == d + p || (g == 0 && d == 1),
                "group {g} has {} packets",
                wire.len()
            );
            wire.shuffle(&mut rng);
            wire.truncate(d + p - loss(g).min(d + p));
            for b in wire {
                dec.decode(&b, g as u32, &mut |k| got.push(k.to_vec()))
                    .unwrap();
            }
        }
        (sent, got, dec.stats())
    }

    #[test]
    fn random_loss_up_to_p_recovers_everything() {
        for (d, p, seed) in [(10, 3, 1u64), (4, 2, 2), (1, 1, 3), (20, 5, 4)] {
            let (mut sent, mut got, st) = random_run(d, p, 40, seed, &|g| g % (p + 1));
            // reordering may deliver a data packet both recovered and as itself: KCP drops duplicates
            sent.sort();
            got.sort();
            got.dedup();
            assert!(
                got == sent,
                "d={d} p={p}: sent {} delivered {} {st:?}",
                sent.len(),
                got.len()
            );
            assert!(st.recovered > 0);
            assert_eq!(st.groups_lost, 0);
        }
    }

    #[test]
    fn heavy_loss_delivers_only_true_data_and_never_panics() {
        let (sent, got, st) = random_run(10, 3, 60, 9, &|g| 4 + g % 9);
        assert!(got.iter().all(|g| sent.contains(g)));
        assert!(got.len() < sent.len());
        assert!(st.groups_lost > 0);
    }

    #[test]
    fn old_groups_expire_and_memory_stays_bounded() {
        let mut enc = FecEncoder::new(2, 1, 0).unwrap();
        let mut dec = FecDecoder::new(2, 1).unwrap();
        let mut bodies = Vec::new();
        for i in 0..10u8 {
            let (d, par) = enc_one(&mut enc, 0, &[i; 5], 0, 1000);
            bodies.push(d);
            bodies.extend(par);
        }
        // group 0 loses its data shard 1; its parity arrives after group 3 has pushed it out
        let mut n = 0;
        dec.decode(&bodies[0], 0, &mut |_| n += 1).unwrap();
        for b in &bodies[3..12] {
            dec.decode(b, 0, &mut |_| n += 1).unwrap();
        }
        dec.decode(&bodies[2], 0, &mut |_| n += 1).unwrap();
        assert_eq!(n, 1 + 6);
        assert_eq!(dec.stats().dropped_too_old, 1);
        assert_eq!(dec.stats().groups_lost, 1);
        assert_eq!(dec.groups.len(), RX_GROUPS);
    }

    #[test]
    fn raw_kcp_passes_through_and_malformed_is_counted() {
        let mut dec = FecDecoder::new(10, 3).unwrap();
        let kcp = [1, 2, 3, 4, 81, 0, 0, 2, 9];
        let mut got = Vec::new();
        dec.decode(&kcp, 0, &mut |k| got.push(k.to_vec())).unwrap();
        assert_eq!(got, vec![kcp.to_vec()]);
        let bad = [0, 0, 0, 0, 0xf1, 0, 0xff, 0xff, 1];
        assert!(matches!(
            dec.decode(&bad, 0, &mut |_| panic!()),
            Err(FecError::BadSize { size: 0xffff, .. })
        ));
        assert_eq!(dec.stats().malformed, 1);
        // a parity packet in a data slot (other shard counts on the peer) is counted, not used
        dec.decode(&[1, 0, 0, 0, 0xf2, 0, 7, 7], 0, &mut |_| panic!())
            .unwrap();
        assert_eq!(dec.stats().misplaced, 1);
    }

    proptest::proptest! {
        #[test]
        fn decode_of_arbitrary_bytes_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..4000)) {
            fuzz_decode(&data);
        }

        #[test]
        fn decode_of_fec_like_packets_never_panics(
            pkts in proptest::collection::vec((0u32..60, proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..64)), 0..80)
        ) {
            let mut dec = FecDecoder::new(4, 2).unwrap();
            for (seq, data, rest) in pkts {
                let mut b = seq.to_le_bytes().to_vec();
                b.extend_from_slice(&if data { [0xf1, 0] } else { [0xf2, 0] });
                b.extend_from_slice(&rest);
                let _ = dec.decode(&b, seq, &mut |k| assert!(k.len() <= 64));
            }
        }
    }
}
