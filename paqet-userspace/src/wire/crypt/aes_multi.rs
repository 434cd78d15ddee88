//! AES-CFB with AES-NI: encryption of up to [`LANES`] datagrams side by side, and decryption of one
//! datagram [`LANES`] blocks at a time.
//!
//! CFB encryption is serial within one datagram (each block's input is the previous ciphertext block), so
//! one datagram alone runs at the AESENC *latency* (≈ 4 cycles per round): about 600 MB/s for AES-256 on
//! the machines here. The datagrams of one KCP flush are independent chains, though, so interleaving the
//! rounds of several of them fills the AES unit's pipeline and runs at its *throughput* instead. This is
//! what makes the sending side of a bulk transfer cheap (see `docs/benchmarks.md`, `crypt_seal_flush`).
//! CFB decryption is parallel within a datagram (every keystream block depends only on ciphertext).
//!
//! The key schedule is FIPS-197's, with SubWord taken from `AESKEYGENASSIST`; the tests check every key
//! size against the `aes` crate, the portable path used when the CPU has no AES-NI.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// Datagrams encrypted together (8 keeps the AES unit busy: latency 4 cycles, throughput 2 per cycle).
pub const LANES: usize = 8;

/// The kcp-go CFB initial vector's first 16 bytes (the feedback register starts from it).
pub type Iv = [u8; 16];

/// An expanded AES key (128, 192 or 256 bit) for the AES-NI path.
#[derive(Clone)]
pub struct AesMulti {
    /// Round keys in memory byte order (as `AESENC` loads them).
    rk: [[u8; 16]; 15],
    rounds: usize,
}

impl AesMulti {
    /// Expands `key` (16, 24 or 32 bytes); `None` when the CPU has no AES-NI or the length is not an AES
    /// key length (callers then use the portable path).
    pub fn new(key: &[u8]) -> Option<Self> {
        if !available() || !matches!(key.len(), 16 | 24 | 32) {
            return None;
        }
        // SAFETY: `available()` checked AES-NI and SSE2.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            return Some(expand(key));
        }
        #[allow(unreachable_code)]
        None
    }

    /// CFB-encrypts each of `pkts` in place from `iv` (full blocks chained; a final partial block is
    /// XORed with the next keystream block, as Go's `cipher.NewCFBEncrypter` does).
    pub fn cfb_encrypt(&self, iv: &Iv, pkts: &mut [&mut [u8]]) {
        for group in pkts.chunks_mut(LANES) {
            // SAFETY: `self` exists only if `available()` was true.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                cfb_encrypt_group(self, iv, group)
            }
        }
    }

    /// CFB-decrypts one datagram in place from `iv`. Every keystream block depends only on ciphertext, so
    /// the blocks of one datagram go through the AES unit [`LANES`] at a time.
    pub fn cfb_decrypt(&self, iv: &Iv, pkt: &mut [u8]) {
        // SAFETY: `self` exists only if `available()` was true.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            cfb_decrypt_one(self, iv, pkt)
        }
    }

    #[cfg(test)]
    /// One block (tests and the key-schedule check): CFB of 16 zero bytes from IV = block is E(block).
    pub fn encrypt_block(&self, block: &mut [u8; 16]) {
        let iv = *block;
        block.fill(0);
        self.cfb_encrypt(&iv, &mut [&mut block[..]]);
    }
}

/// AES-NI present (checked once per call site; the std macro caches the CPUID result).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("aes") && std::is_x86_feature_detected!("sse2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// SubWord of a little-endian word (byte 0 in the low bits) through `AESKEYGENASSIST`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn sub_word(w: u32) -> u32 {
    // AESKEYGENASSIST puts SubWord(X1) in lane 0 of its result.
    let x = _mm_set_epi32(0, 0, w as i32, 0);
    _mm_cvtsi128_si32(_mm_aeskeygenassist_si128::<0>(x)) as u32
}

/// FIPS-197 key expansion (Nk = 4, 6, 8 words).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn expand(key: &[u8]) -> AesMulti {
    const RCON: [u32; 10] = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1b, 0x36];
    let nk = key.len() / 4;
    let rounds = nk + 6;
    let total = 4 * (rounds + 1);
    let mut w = [0u32; 60];
    for (i, c) in key.chunks_exact(4).enumerate() {
        w[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    for i in nk..total {
        let mut t = w[i - 1];
        if i % nk == 0 {
            // RotWord moves byte 1 to byte 0: a right rotation of the little-endian word.
            t = sub_word(t.rotate_right(8)) ^ RCON[i / nk - 1];
        } else if nk > 6 && i % nk == 4 {
            t = sub_word(t);
        }
        w[i] = w[i - nk] ^ t;
    }
    let mut rk = [[0u8; 16]; 15];
    for (r, k) in rk.iter_mut().enumerate().take(rounds + 1) {
        for j in 0..4 {
            k[4 * j..4 * j + 4].copy_from_slice(&w[4 * r + j].to_le_bytes());
        }
    }
    AesMulti { rk, rounds }
}

/// Encrypts up to [`LANES`] feedback registers in lockstep (unused lanes compute harmlessly).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
#[inline]
unsafe fn encrypt_lanes(rk: &[__m128i; 15], rounds: usize, b: &mut [__m128i; LANES]) {
    for x in b.iter_mut() {
        *x = _mm_xor_si128(*x, rk[0]);
    }
    for k in &rk[1..rounds] {
        for x in b.iter_mut() {
            *x = _mm_aesenc_si128(*x, *k);
        }
    }
    let last = rk[rounds];
    for x in b.iter_mut() {
        *x = _mm_aesenclast_si128(*x, last);
    }
}

/// The round keys in registers (the unused tail of the array stays zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
#[inline]
unsafe fn round_keys(key: &AesMulti) -> [__m128i; 15] {
    let mut rk = [_mm_setzero_si128(); 15];
    for (d, s) in rk.iter_mut().zip(&key.rk).take(key.rounds + 1) {
        *d = _mm_loadu_si128(s.as_ptr().cast());
    }
    rk
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn cfb_encrypt_group(key: &AesMulti, iv: &Iv, group: &mut [&mut [u8]]) {
    debug_assert!(group.len() <= LANES);
    let rk = round_keys(key);
    let ivv = _mm_loadu_si128(iv.as_ptr().cast());
    let mut fb = [ivv; LANES];
    let mut off = [0usize; LANES];
    let longest = group.iter().map(|p| p.len()).max().unwrap_or(0);
    let steps = longest.div_ceil(16);
    for _ in 0..steps {
        encrypt_lanes(&rk, key.rounds, &mut fb);
        for (lane, pkt) in group.iter_mut().enumerate() {
            let o = off[lane];
            let rest = pkt.len() - o;
            if rest >= 16 {
                // SAFETY: `o + 16 <= pkt.len()`.
                let p = pkt.as_mut_ptr().add(o).cast::<__m128i>();
                let c = _mm_xor_si128(_mm_loadu_si128(p), fb[lane]);
                _mm_storeu_si128(p, c);
                fb[lane] = c;
                off[lane] = o + 16;
            } else if rest > 0 {
                let mut ks = [0u8; 16];
                _mm_storeu_si128(ks.as_mut_ptr().cast(), fb[lane]);
                for (d, k) in pkt[o..].iter_mut().zip(ks) {
                    *d ^= k;
                }
                off[lane] = pkt.len();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn cfb_decrypt_one(key: &AesMulti, iv: &Iv, pkt: &mut [u8]) {
    let rk = round_keys(key);
    let mut prev = _mm_loadu_si128(iv.as_ptr().cast());
    let full = pkt.len() / 16;
    let base = pkt.as_mut_ptr().cast::<__m128i>();
    let mut i = 0;
    while i < full {
        let k = LANES.min(full - i);
        // Keystream inputs: the previous ciphertext block of each block in this group. (Plain index
        // loops: an iterator chain here was not inlined into this target-feature function.)
        let mut ks = [prev; LANES];
        let mut j = 1;
        while j < k {
            // SAFETY: block i + j - 1 < full.
            ks[j] = _mm_loadu_si128(base.add(i + j - 1));
            j += 1;
        }
        prev = _mm_loadu_si128(base.add(i + k - 1));
        encrypt_lanes(&rk, key.rounds, &mut ks);
        let mut j = 0;
        while j < k {
            let p = base.add(i + j);
            _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), ks[j]));
            j += 1;
        }
        i += k;
    }
    let tail = &mut pkt[full * 16..];
    if !tail.is_empty() {
        let mut ks = [prev; LANES];
        encrypt_lanes(&rk, key.rounds, &mut ks);
        let mut b = [0u8; 16];
        _mm_storeu_si128(b.as_mut_ptr().cast(), ks[0]);
        for (d, k) in tail.iter_mut().zip(b) {
            *d ^= k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockEncrypt, KeyInit};
    use rand::{Rng, SeedableRng};

    fn reference_block(key: &[u8], block: &mut [u8; 16]) {
        let b = aes::cipher::generic_array::GenericArray::from_mut_slice(block);
        match key.len() {
            16 => aes::Aes128Enc::new_from_slice(key)
                .unwrap()
                .encrypt_block(b),
            24 => aes::Aes192Enc::new_from_slice(key)
                .unwrap()
                .encrypt_block(b),
            _ => aes::Aes256Enc::new_from_slice(key)
                .unwrap()
                .encrypt_block(b),
        }
    }

    /// Go's CFB encrypter (full blocks chained, partial tail XORed), block by block with the `aes` crate.
    fn reference_cfb(key: &[u8], iv: &Iv, pkt: &mut [u8]) {
        let mut fb = *iv;
        for chunk in pkt.chunks_mut(16) {
            reference_block(key, &mut fb);
            for (p, k) in chunk.iter_mut().zip(fb.iter_mut()) {
                *p ^= *k;
                *k = *p;
            }
        }
    }

    #[test]
    fn fips197_appendix_c_vectors() {
        if !available() {
            eprintln!("skipping: no AES-NI on this CPU");
            return;
        }
        let pt: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        let cases: [(usize, &str); 3] = [
            (16, "69c4e0d86a7b0430d8cdb78070b4c55a"),
            (24, "dda97ca4864cdfe06eaf70a0ec0d7191"),
            (32, "8ea2b7ca516745bfeafc49904b496089"),
        ];
        for (len, want) in cases {
            let key: Vec<u8> = (0..len as u8).collect();
            let k = AesMulti::new(&key).unwrap();
            let mut b = pt;
            k.encrypt_block(&mut b);
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            assert_eq!(hex, want, "AES-{}", len * 8);
        }
    }

    #[test]
    fn matches_the_aes_crate_for_every_key_size_and_length_mix() {
        if !available() {
            eprintln!("skipping: no AES-NI on this CPU");
            return;
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for len in [16usize, 24, 32] {
            for _ in 0..20 {
                let key: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let iv: Iv = rng.gen();
                let k = AesMulti::new(&key).unwrap();
                // 0..=19 datagrams (more than one group), lengths 0..1500 incl. partial tails.
                let count = rng.gen_range(0..20);
                let mut pkts: Vec<Vec<u8>> = (0..count)
                    .map(|_| {
                        let l = rng.gen_range(0..1500);
                        (0..l).map(|_| rng.gen()).collect()
                    })
                    .collect();
                let mut want = pkts.clone();
                for p in &mut want {
                    reference_cfb(&key, &iv, p);
                }
                let plain = pkts.clone();
                let mut views: Vec<&mut [u8]> = pkts.iter_mut().map(|p| &mut p[..]).collect();
                k.cfb_encrypt(&iv, &mut views);
                assert_eq!(pkts, want, "AES-{} with {count} datagrams", len * 8);
                for (p, orig) in pkts.iter_mut().zip(&plain) {
                    k.cfb_decrypt(&iv, p);
                    assert_eq!(p, orig, "AES-{} decrypt of {} bytes", len * 8, orig.len());
                }
            }
        }
    }

    #[test]
    fn rejects_non_aes_key_lengths() {
        assert!(AesMulti::new(&[0u8; 20]).is_none());
        assert!(AesMulti::new(&[]).is_none());
    }
}
