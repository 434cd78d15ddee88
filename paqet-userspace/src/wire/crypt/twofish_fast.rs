//! Table-driven Twofish-256 (Schneier et al., "Twofish: A 128-Bit Block Cipher", 1998).
//!
//! The key-dependent S-boxes are folded with the MDS matrix at key set-up into four 256-entry `u32`
//! tables, so the `g` function costs four lookups and three XORs (the "full keying" option of the
//! reference optimized implementation). The `twofish` 0.7 crate instead recomputes the S-boxes with
//! field multiplications for every block, which made the `twofish` block mode ~100x slower.
//!
//! Only 256-bit keys are supported: kcp-go's `twofish` mode always uses the whole 32-byte derived key.
use cipher::consts::{U1, U16, U4};
use cipher::inout::InOut;
use cipher::{
    Block, BlockBackend, BlockCipher, BlockClosure, BlockDecrypt, BlockEncrypt, BlockSizeUser,
    ParBlocks, ParBlocksSizeUser,
};

/// Twofish's 4-bit permutations `t0..t3` for `q0` (first four) and `q1` (last four), spec §4.3.5.
const Q_T: [[[u8; 16]; 4]; 2] = [
    [
        [8, 1, 7, 13, 6, 15, 3, 2, 0, 11, 5, 9, 14, 12, 10, 4],
        [14, 12, 11, 8, 1, 2, 3, 5, 15, 4, 10, 6, 7, 0, 9, 13],
        [11, 10, 5, 14, 6, 13, 9, 0, 12, 8, 15, 3, 2, 4, 7, 1],
        [13, 7, 15, 4, 1, 2, 6, 14, 9, 11, 3, 0, 8, 5, 12, 10],
    ],
    [
        [2, 8, 11, 13, 15, 7, 6, 14, 3, 1, 9, 4, 0, 10, 12, 5],
        [1, 14, 2, 11, 4, 12, 3, 7, 6, 13, 10, 5, 15, 9, 0, 8],
        [4, 12, 7, 5, 1, 6, 9, 10, 0, 14, 13, 8, 2, 11, 3, 15],
        [11, 9, 5, 1, 12, 3, 13, 14, 6, 4, 7, 15, 2, 0, 8, 10],
    ],
];

/// 4-bit rotate right by one.
const fn ror4(x: u8) -> u8 {
    ((x >> 1) | (x << 3)) & 0x0F
}

/// The fixed 8-bit permutation `q0` (`which == 0`) or `q1` (`which == 1`) built from its nibble tables.
const fn build_q(which: usize) -> [u8; 256] {
    let t = &Q_T[which];
    let mut out = [0u8; 256];
    let mut x = 0;
    while x < 256 {
        let (a0, b0) = ((x >> 4) as u8, (x & 0x0F) as u8);
        let a1 = a0 ^ b0;
        let b1 = (a0 ^ ror4(b0) ^ (a0 << 3)) & 0x0F;
        let (a2, b2) = (t[0][a1 as usize], t[1][b1 as usize]);
        let a3 = a2 ^ b2;
        let b3 = (a2 ^ ror4(b2) ^ (a2 << 3)) & 0x0F;
        let (a4, b4) = (t[2][a3 as usize], t[3][b3 as usize]);
        out[x] = (b4 << 4) | a4;
        x += 1;
    }
    out
}

const Q0: [u8; 256] = build_q(0);
const Q1: [u8; 256] = build_q(1);

/// Multiplication in GF(2^8) modulo the primitive polynomial `poly` (0x169 for MDS, 0x14D for RS).
const fn gf_mul(mut a: u8, mut b: u8, poly: u16) -> u8 {
    let mut acc = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            acc ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= (poly & 0xFF) as u8;
        }
        b >>= 1;
    }
    acc
}

const MDS_POLY: u16 = 0x169;
const RS_POLY: u16 = 0x14D;

const MDS: [[u8; 4]; 4] = [
    [0x01, 0xEF, 0x5B, 0x5B],
    [0x5B, 0xEF, 0xEF, 0x01],
    [0xEF, 0x5B, 0x01, 0xEF],
    [0xEF, 0x01, 0xEF, 0x5B],
];

const RS: [[u8; 8]; 4] = [
    [0x01, 0xA4, 0x55, 0x87, 0x5A, 0x58, 0xDB, 0x9E],
    [0xA4, 0x56, 0x82, 0xF3, 0x1E, 0xC6, 0x68, 0xE5],
    [0x02, 0xA1, 0xFC, 0xC1, 0x47, 0xAE, 0x3D, 0x19],
    [0xA4, 0x55, 0x87, 0x5A, 0x58, 0xDB, 0x9E, 0x03],
];

/// `MDS_COL[j][y]`: the MDS matrix times the vector with `y` at position `j` and zeros elsewhere, as a
/// little-endian word. The key-dependent tables are `MDS_COL[j][sbox_j(x)]`.
const fn build_mds_cols() -> [[u32; 256]; 4] {
    let mut out = [[0u32; 256]; 4];
    let mut j = 0;
    while j < 4 {
        let mut y = 0;
        while y < 256 {
            let mut w = 0u32;
            let mut r = 0;
            while r < 4 {
                w |= (gf_mul(MDS[r][j], y as u8, MDS_POLY) as u32) << (8 * r);
                r += 1;
            }
            out[j][y] = w;
            y += 1;
        }
        j += 1;
    }
    out
}

const MDS_COL: [[u32; 256]; 4] = build_mds_cols();

/// The key-dependent byte permutation of input position `j` (`l` = the four key words `L0..L3`).
fn sbox(j: usize, x: u8, l: &[u32; 4]) -> u8 {
    let kb = |i: usize| (l[i] >> (8 * j)) as u8;
    let (q0, q1) = (&Q0, &Q1);
    // Stage tables per position: k=4 stage, k=3 stage, then the three common stages.
    let [s4, s3, s2, s1, s0] = match j {
        0 => [q1, q1, q0, q0, q1],
        1 => [q0, q1, q1, q0, q0],
        2 => [q0, q0, q0, q1, q1],
        _ => [q1, q0, q1, q1, q0],
    };
    let y = s4[x as usize] ^ kb(3);
    let y = s3[y as usize] ^ kb(2);
    let y = s2[y as usize] ^ kb(1);
    let y = s1[y as usize] ^ kb(0);
    s0[y as usize]
}

/// The `h` function (spec §4.3.2) for key set-up: every byte of the input word is `x`.
fn h(x: u8, l: &[u32; 4]) -> u32 {
    (0..4).fold(0, |acc, j| acc ^ MDS_COL[j][sbox(j, x, l) as usize])
}

/// Twofish with a 256-bit key, key-dependent S-boxes precomputed (≈ 4.2 KiB; box it when embedding).
#[derive(Clone)]
pub struct Twofish {
    /// `g(x) = s[0][x0] ^ s[1][x1] ^ s[2][x2] ^ s[3][x3]`.
    s: [[u32; 256]; 4],
    /// Whitening (0..8) and round (8..40) subkeys.
    k: [u32; 40],
}

impl Twofish {
    /// Key schedule for a 32-byte key.
    pub fn new(key: &[u8; 32]) -> Self {
        let m: [u32; 8] = std::array::from_fn(|i| {
            u32::from_le_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]])
        });
        let me = [m[0], m[2], m[4], m[6]];
        let mo = [m[1], m[3], m[5], m[7]];
        // S-box key words S_i = RS · key[8i..8i+8], used in reverse order (L0 = S3 ... L3 = S0).
        let mut sk = [0u32; 4];
        for i in 0..4 {
            let mut w = 0u32;
            for (r, row) in RS.iter().enumerate() {
                let b = row
                    .iter()
                    .zip(&key[8 * i..8 * i + 8])
                    .fold(0u8, |acc, (&c, &kb)| acc ^ gf_mul(c, kb, RS_POLY));
                w |= u32::from(b) << (8 * r);
            }
            sk[3 - i] = w;
        }
        let mut k = [0u32; 40];
        for i in 0..20 {
            let a = h(2 * i as u8, &me);
            let b = h(2 * i as u8 + 1, &mo).rotate_left(8);
            k[2 * i] = a.wrapping_add(b);
            k[2 * i + 1] = a.wrapping_add(b.wrapping_mul(2)).rotate_left(9);
        }
        let mut s = [[0u32; 256]; 4];
        for (j, table) in s.iter_mut().enumerate() {
            for (x, e) in table.iter_mut().enumerate() {
                *e = MDS_COL[j][sbox(j, x as u8, &sk) as usize];
            }
        }
        Twofish { s, k }
    }

    #[inline(always)]
    fn g(&self, x: u32) -> u32 {
        self.s[0][(x & 0xFF) as usize]
            ^ self.s[1][((x >> 8) & 0xFF) as usize]
            ^ self.s[2][((x >> 16) & 0xFF) as usize]
            ^ self.s[3][(x >> 24) as usize]
    }

    /// Encrypts one block given as four little-endian words.
    #[inline]
    pub fn encrypt_words(&self, p: [u32; 4]) -> [u32; 4] {
        self.encrypt_lanes([p])[0]
    }

    /// Encrypts `N` independent blocks with their rounds interleaved, so that the table lookups of
    /// one block overlap the dependency chain of the others (used by CFB decryption).
    #[inline(always)]
    fn encrypt_lanes<const N: usize>(&self, p: [[u32; 4]; N]) -> [[u32; 4]; N] {
        let k = &self.k;
        let mut st: [[u32; 4]; N] = std::array::from_fn(|l| {
            [
                p[l][0] ^ k[0],
                p[l][1] ^ k[1],
                p[l][2] ^ k[2],
                p[l][3] ^ k[3],
            ]
        });
        // Two rounds per iteration so that the halves never need swapping.
        for rk in k[8..].chunks_exact(4) {
            for [a, b, c, d] in st.iter_mut() {
                let t0 = self.g(*a);
                let t1 = self.g(b.rotate_left(8));
                *c = (*c ^ t0.wrapping_add(t1).wrapping_add(rk[0])).rotate_right(1);
                *d = d.rotate_left(1) ^ t0.wrapping_add(t1.wrapping_mul(2)).wrapping_add(rk[1]);
            }
            for [a, b, c, d] in st.iter_mut() {
                let t0 = self.g(*c);
                let t1 = self.g(d.rotate_left(8));
                *a = (*a ^ t0.wrapping_add(t1).wrapping_add(rk[2])).rotate_right(1);
                *b = b.rotate_left(1) ^ t0.wrapping_add(t1.wrapping_mul(2)).wrapping_add(rk[3]);
            }
        }
        st.map(|[a, b, c, d]| [c ^ k[4], d ^ k[5], a ^ k[6], b ^ k[7]])
    }

    /// Decrypts one block given as four little-endian words.
    #[inline]
    pub fn decrypt_words(&self, ct: [u32; 4]) -> [u32; 4] {
        let k = &self.k;
        let (mut c, mut d, mut a, mut b) = (ct[0] ^ k[4], ct[1] ^ k[5], ct[2] ^ k[6], ct[3] ^ k[7]);
        for rk in k[8..].chunks_exact(4).rev() {
            let t0 = self.g(c);
            let t1 = self.g(d.rotate_left(8));
            a = a.rotate_left(1) ^ t0.wrapping_add(t1).wrapping_add(rk[2]);
            b = (b ^ t0.wrapping_add(t1.wrapping_mul(2)).wrapping_add(rk[3])).rotate_right(1);
            let t0 = self.g(a);
            let t1 = self.g(b.rotate_left(8));
            c = c.rotate_left(1) ^ t0.wrapping_add(t1).wrapping_add(rk[0]);
            d = (d ^ t0.wrapping_add(t1.wrapping_mul(2)).wrapping_add(rk[1])).rotate_right(1);
        }
        [a ^ k[0], b ^ k[1], c ^ k[2], d ^ k[3]]
    }
}

fn load(b: &[u8]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}

fn store(b: &mut [u8], w: [u32; 4]) {
    for (chunk, v) in b.chunks_exact_mut(4).zip(w) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

impl BlockCipher for Twofish {}

impl BlockSizeUser for Twofish {
    type BlockSize = U16;
}

/// Blocks a parallel encryption call processes together (see [`Twofish::encrypt_lanes`]).
type Lanes = U4;

/// Encryption backend: [`Lanes`] blocks at a time for `encrypt_blocks` (CFB decryption).
struct EncBackend<'a>(&'a Twofish);

impl BlockSizeUser for EncBackend<'_> {
    type BlockSize = U16;
}

impl ParBlocksSizeUser for EncBackend<'_> {
    type ParBlocksSize = Lanes;
}

impl BlockBackend for EncBackend<'_> {
    #[inline(always)]
    fn proc_block(&mut self, mut block: InOut<'_, '_, Block<Self>>) {
        let w = self.0.encrypt_words(load(block.get_in()));
        store(block.get_out(), w);
    }

    #[inline(always)]
    fn proc_par_blocks(&mut self, mut blocks: InOut<'_, '_, ParBlocks<Self>>) {
        let input: [[u32; 4]; 4] = std::array::from_fn(|i| load(&blocks.get_in()[i]));
        let out = self.0.encrypt_lanes(input);
        for (dst, w) in blocks.get_out().iter_mut().zip(out) {
            store(dst, w);
        }
    }
}

impl BlockEncrypt for Twofish {
    fn encrypt_with_backend(&self, f: impl BlockClosure<BlockSize = U16>) {
        f.call(&mut EncBackend(self))
    }
}

/// Decryption backend (one block at a time: CFB never decrypts with the block cipher).
struct DecBackend<'a>(&'a Twofish);

impl BlockSizeUser for DecBackend<'_> {
    type BlockSize = U16;
}

impl ParBlocksSizeUser for DecBackend<'_> {
    type ParBlocksSize = U1;
}

impl BlockBackend for DecBackend<'_> {
    #[inline(always)]
    fn proc_block(&mut self, mut block: InOut<'_, '_, Block<Self>>) {
        let w = self.0.decrypt_words(load(block.get_in()));
        store(block.get_out(), w);
    }
}

impl BlockDecrypt for Twofish {
    fn decrypt_with_backend(&self, f: impl BlockClosure<BlockSize = U16>) {
        f.call(&mut DecBackend(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cipher::generic_array::GenericArray;
    use cipher::KeyInit;
    use rand::{Rng, SeedableRng};

    #[test]
    fn q_tables_are_permutations() {
        for q in [&Q0, &Q1] {
            let mut seen = [false; 256];
            for &v in q.iter() {
                assert!(!seen[v as usize], "duplicate {v:#04x}");
                seen[v as usize] = true;
            }
        }
        // First entries of q0/q1 as printed in the Twofish paper's reference tables.
        assert_eq!(&Q0[..4], &[0xA9, 0x67, 0xB3, 0xE8]);
        assert_eq!(&Q1[..4], &[0x75, 0xF3, 0xC6, 0xF4]);
    }

    #[test]
    fn known_answer_zero_key() {
        // Twofish paper / ecb_tbl.txt: 256-bit all-zero key, all-zero plaintext.
        let t = Twofish::new(&[0u8; 32]);
        let mut b = GenericArray::clone_from_slice(&[0u8; 16]);
        t.encrypt_block(&mut b);
        assert_eq!(hex::encode(b), "57ff739d4dc92c1bd7fc01700cc8216f");
        t.decrypt_block(&mut b);
        assert_eq!(b.as_slice(), &[0u8; 16]);
    }

    #[test]
    fn matches_the_twofish_crate_on_random_keys_and_blocks() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x7F15);
        for _ in 0..64 {
            let key: [u8; 32] = rng.gen();
            let ours = Twofish::new(&key);
            let theirs = ::twofish::Twofish::new_from_slice(&key).unwrap();
            for _ in 0..16 {
                let pt: [u8; 16] = rng.gen();
                let mut a = GenericArray::clone_from_slice(&pt);
                let mut b = a;
                ours.encrypt_block(&mut a);
                theirs.encrypt_block(&mut b);
                assert_eq!(a, b, "key {} pt {}", hex::encode(key), hex::encode(pt));
                ours.decrypt_block(&mut a);
                assert_eq!(a.as_slice(), &pt);
            }
            // The interleaved multi-block path (lanes + tail) must agree block by block.
            for n in [1usize, 3, 4, 7, 8, 9] {
                let blocks: Vec<Block<Twofish>> = (0..n)
                    .map(|_| GenericArray::clone_from_slice(&rng.gen::<[u8; 16]>()))
                    .collect();
                let mut a = blocks.clone();
                let mut b = blocks;
                ours.encrypt_blocks(&mut a);
                for blk in b.iter_mut() {
                    theirs.encrypt_block(blk);
                }
                assert_eq!(a, b, "key {} with {n} blocks", hex::encode(key));
            }
        }
    }
}
