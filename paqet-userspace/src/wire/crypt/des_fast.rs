//! Table-driven 3DES-EDE (FIPS 46-3 DES, keying option 1: three independent 8-byte keys).
//!
//! The S-boxes are merged with the P permutation into eight 64-entry `u32` "SP" tables and the round key
//! is stored as two pre-aligned words, so a round is two rotates, eight lookups and a few XOR/shift
//! operations. The intermediate FP/IP pairs between the three DES stages cancel and are skipped. The
//! `des` 0.8 crate computes E, the S-boxes and P bit by bit for every round, which made `3des` the
//! slowest mode but one. All tables are built at compile time from the standard's tables below.

/// Initial permutation (1-indexed source bit for each output bit, MSB first).
const IP: [u8; 64] = [
    58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4, 62, 54, 46, 38, 30, 22, 14, 6,
    64, 56, 48, 40, 32, 24, 16, 8, 57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3, 61,
    53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
];

/// Round permutation P applied to the S-box outputs.
const P: [u8; 32] = [
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10, 2, 8, 24, 14, 32, 27, 3, 9, 19,
    13, 30, 6, 22, 11, 4, 25,
];

/// Permuted choice 1 (64-bit key → 56 bits; parity bits dropped).
const PC1: [u8; 56] = [
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60,
    52, 44, 36, 63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6, 61, 53, 45, 37, 29,
    21, 13, 5, 28, 20, 12, 4,
];

/// Permuted choice 2 (56 bits → 48-bit round key).
const PC2: [u8; 48] = [
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2, 41, 52,
    31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
];

/// Left rotations of the C and D key halves per round.
const SHIFTS: [u32; 16] = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1];

/// S-boxes S1..S8 as printed in the standard: `[row][column]`, row = outer input bits, column = inner.
const S: [[[u8; 16]; 4]; 8] = [
    [
        [14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7],
        [0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8],
        [4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0],
        [15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13],
    ],
    [
        [15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10],
        [3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5],
        [0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15],
        [13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9],
    ],
    [
        [10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8],
        [13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1],
        [13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7],
        [1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12],
    ],
    [
        [7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15],
        [13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9],
        [10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4],
        [3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14],
    ],
    [
        [2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9],
        [14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6],
        [4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14],
        [11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3],
    ],
    [
        [12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11],
        [10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8],
        [9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6],
        [4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13],
    ],
    [
        [4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1],
        [13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6],
        [1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2],
        [6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12],
    ],
    [
        [13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7],
        [1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2],
        [7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8],
        [2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11],
    ],
];

/// Bit permutation: output bit `i` (1-indexed from the MSB of a `table.len()`-bit result) is input
/// bit `table[i-1]` (1-indexed from the MSB of a `width`-bit input).
const fn permute(input: u64, width: u32, table: &[u8]) -> u64 {
    let n = table.len();
    let mut out = 0u64;
    let mut i = 0;
    while i < n {
        let bit = (input >> (width - table[i] as u32)) & 1;
        out |= bit << (n - 1 - i);
        i += 1;
    }
    out
}

/// The inverse of a 64-entry permutation table.
const fn invert(table: &[u8; 64]) -> [u8; 64] {
    let mut out = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        out[table[i] as usize - 1] = (i + 1) as u8;
        i += 1;
    }
    out
}

const FP: [u8; 64] = invert(&IP);

/// Byte-sliced form of a 64-bit permutation: `t[p][v]` = the permutation of byte `v` at position `p`
/// (0 = most significant) with every other byte zero; the permutation is the OR over the 8 bytes.
const fn byte_tables(table: &[u8; 64]) -> [[u64; 256]; 8] {
    let mut out = [[0u64; 256]; 8];
    let mut p = 0;
    while p < 8 {
        let mut v = 0;
        while v < 256 {
            out[p][v] = permute((v as u64) << (8 * (7 - p)), 64, table);
            v += 1;
        }
        p += 1;
    }
    out
}

const IP_T: [[u64; 256]; 8] = byte_tables(&IP);
const FP_T: [[u64; 256]; 8] = byte_tables(&FP);

/// `SP[j][v]`: P applied to S-box `j`'s output for the 6-bit input `v` (placed in nibble `j`).
const fn sp_tables() -> [[u32; 64]; 8] {
    let mut out = [[0u32; 64]; 8];
    let mut j = 0;
    while j < 8 {
        let mut v = 0;
        while v < 64 {
            let row = ((v >> 4) & 2) | (v & 1);
            let col = (v >> 1) & 0x0F;
            let s = S[j][row][col] as u64;
            out[j][v] = permute(s << (28 - 4 * j), 32, &P) as u32;
            v += 1;
        }
        j += 1;
    }
    out
}

const SP: [[u32; 64]; 8] = sp_tables();

#[inline(always)]
fn apply(t: &[[u64; 256]; 8], x: u64) -> u64 {
    let b = x.to_be_bytes();
    t[0][b[0] as usize]
        | t[1][b[1] as usize]
        | t[2][b[2] as usize]
        | t[3][b[3] as usize]
        | t[4][b[4] as usize]
        | t[5][b[5] as usize]
        | t[6][b[6] as usize]
        | t[7][b[7] as usize]
}

/// One round key as two words: the even-numbered 6-bit chunks (S1, S3, S5, S7) aligned with
/// `R.rotate_right(1)`, the odd ones (S2, S4, S6, S8) aligned with `R.rotate_left(3)`, each at bit
/// offsets 26, 18, 10, 2.
type RoundKey = [u32; 2];

/// The 16 round keys of one DES key, in encryption order.
fn des_round_keys(key: &[u8]) -> [RoundKey; 16] {
    let k = u64::from_be_bytes([
        key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
    ]);
    let cd = permute(k, 64, &PC1);
    let (mut c, mut d) = ((cd >> 28) as u32, (cd & 0x0FFF_FFFF) as u32);
    let rot28 = |x: u32, s: u32| ((x << s) | (x >> (28 - s))) & 0x0FFF_FFFF;
    std::array::from_fn(|round| {
        c = rot28(c, SHIFTS[round]);
        d = rot28(d, SHIFTS[round]);
        let k48 = permute((u64::from(c) << 28) | u64::from(d), 56, &PC2);
        let chunk = |j: usize| ((k48 >> (42 - 6 * j)) & 0x3F) as u32;
        let mut rk = [0u32; 2];
        for j in 0..8 {
            rk[j & 1] |= chunk(j) << (26 - 8 * (j / 2));
        }
        rk
    })
}

/// The DES round function f(R, K).
#[inline(always)]
fn f(r: u32, k: &RoundKey) -> u32 {
    let x = r.rotate_right(1) ^ k[0];
    let y = r.rotate_left(3) ^ k[1];
    SP[0][((x >> 26) & 0x3F) as usize]
        ^ SP[2][((x >> 18) & 0x3F) as usize]
        ^ SP[4][((x >> 10) & 0x3F) as usize]
        ^ SP[6][((x >> 2) & 0x3F) as usize]
        ^ SP[1][((y >> 26) & 0x3F) as usize]
        ^ SP[3][((y >> 18) & 0x3F) as usize]
        ^ SP[5][((y >> 10) & 0x3F) as usize]
        ^ SP[7][((y >> 2) & 0x3F) as usize]
}

/// 3DES-EDE with a 24-byte key (`K1 | K2 | K3`), as Go's `des.NewTripleDESCipher` and the `des` crate's
/// `TdesEde3`: `C = E_K3(D_K2(E_K1(P)))`.
#[derive(Clone)]
pub struct TripleDes {
    /// The 48 round keys of the whole EDE chain in encryption order.
    ek: [RoundKey; 48],
    /// The same keys backwards: decryption of the chain.
    dk: [RoundKey; 48],
}

impl TripleDes {
    pub fn new(key: &[u8; 24]) -> Self {
        let k1 = des_round_keys(&key[0..8]);
        let mut k2 = des_round_keys(&key[8..16]);
        k2.reverse();
        let k3 = des_round_keys(&key[16..24]);
        let mut ek = [[0u32; 2]; 48];
        ek[..16].copy_from_slice(&k1);
        ek[16..32].copy_from_slice(&k2);
        ek[32..].copy_from_slice(&k3);
        let mut dk = ek;
        dk.reverse();
        TripleDes { ek, dk }
    }

    /// Runs 48 rounds (three DES stages, the cancelling FP/IP pairs between them skipped) over `N`
    /// independent blocks, interleaved so that their dependency chains overlap.
    #[inline(always)]
    fn crypt<const N: usize>(blocks: [u64; N], keys: &[RoundKey; 48]) -> [u64; N] {
        let mut st: [(u32, u32); N] = std::array::from_fn(|i| {
            let x = apply(&IP_T, blocks[i]);
            ((x >> 32) as u32, x as u32)
        });
        for stage in keys.chunks_exact(16) {
            // Two rounds per step alternate the halves instead of swapping them.
            for pair in stage.chunks_exact(2) {
                for (l, r) in st.iter_mut() {
                    *l ^= f(*r, &pair[0]);
                }
                for (l, r) in st.iter_mut() {
                    *r ^= f(*l, &pair[1]);
                }
            }
            // The DES pre-output swap; the next stage's IP would undo this stage's FP.
            for (l, r) in st.iter_mut() {
                std::mem::swap(l, r);
            }
        }
        st.map(|(l, r)| apply(&FP_T, (u64::from(l) << 32) | u64::from(r)))
    }

    /// Encrypts one big-endian block.
    #[inline]
    pub fn encrypt_u64(&self, block: u64) -> u64 {
        Self::crypt([block], &self.ek)[0]
    }

    /// Decrypts one big-endian block.
    #[inline]
    pub fn decrypt_u64(&self, block: u64) -> u64 {
        Self::crypt([block], &self.dk)[0]
    }

    /// Encrypts `N` independent blocks interleaved (the parallel CFB-decryption backend).
    #[inline(always)]
    fn enc_lanes<const N: usize>(&self, blocks: [u64; N]) -> [u64; N] {
        Self::crypt(blocks, &self.ek)
    }

    fn dec_u64(&self, block: u64) -> u64 {
        self.decrypt_u64(block)
    }
}

impl_u64_block_cipher!(TripleDes);

#[cfg(test)]
mod tests {
    use super::*;
    use cipher::generic_array::GenericArray;
    use cipher::{Block, BlockDecrypt, BlockEncrypt, KeyInit};
    use rand::{Rng, SeedableRng};

    #[test]
    fn fp_inverts_ip() {
        for x in [
            0u64,
            1,
            0x0123_4567_89AB_CDEF,
            u64::MAX,
            0x8000_0000_0000_0001,
        ] {
            assert_eq!(apply(&FP_T, apply(&IP_T, x)), x);
            assert_eq!(apply(&IP_T, x), permute(x, 64, &IP));
        }
    }

    #[test]
    fn single_des_known_answer_via_equal_keys() {
        // Classic worked example: K = 133457799BBCDFF1, P = 0123456789ABCDEF → 85E813540F0AB405.
        // With K1 = K2 = K3, EDE degenerates to single DES.
        let k = hex::decode("133457799BBCDFF1").unwrap();
        let key: [u8; 24] = std::array::from_fn(|i| k[i % 8]);
        let t = TripleDes::new(&key);
        assert_eq!(t.encrypt_u64(0x0123_4567_89AB_CDEF), 0x85E8_1354_0F0A_B405);
        assert_eq!(t.decrypt_u64(0x85E8_1354_0F0A_B405), 0x0123_4567_89AB_CDEF);
    }

    #[test]
    fn matches_the_des_crate_on_random_keys_and_blocks() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x3DE5);
        for _ in 0..64 {
            let key: [u8; 24] = rng.gen();
            let ours = TripleDes::new(&key);
            let theirs = ::des::TdesEde3::new_from_slice(&key).unwrap();
            for _ in 0..16 {
                let pt: [u8; 8] = rng.gen();
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
                let blocks: Vec<Block<TripleDes>> = (0..n)
                    .map(|_| GenericArray::clone_from_slice(&rng.gen::<[u8; 8]>()))
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
