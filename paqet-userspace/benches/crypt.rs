//! Seal + open of one 1350-byte datagram (the default paqet MTU) for every kcp-go block mode, and the
//! crate's own table-driven Twofish / 3DES side by side with the `twofish` / `des` crates they replaced.
use cipher::generic_array::GenericArray;
use cipher::{Block, BlockEncrypt, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use paqet::wire::crypt::{BlockMode, Crypto, TripleDes, Twofish};
use std::hint::black_box;

const DATAGRAM: usize = 1350;

fn seal_open(c: &mut Criterion) {
    let dkey: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(29) ^ 0x3C);
    let mut group = c.benchmark_group("crypt_seal_open");
    group.throughput(Throughput::Bytes(DATAGRAM as u64));
    for mode in BlockMode::ALL {
        let mut crypto = Crypto::from_derived(mode, &dkey).expect("valid key");
        crypto.set_nonce_seed(1);
        let body_len = DATAGRAM - crypto.overhead();
        let h = crypto.header_len();
        let body: Vec<u8> = (0..body_len).map(|i| i as u8).collect();
        let mut buf = vec![0u8; DATAGRAM];
        group.bench_function(BenchmarkId::from_parameter(mode), |b| {
            b.iter(|| {
                buf[h..h + body_len].copy_from_slice(&body);
                let n = crypto
                    .seal(&mut buf, body_len)
                    .expect("room for the datagram");
                let r = crypto
                    .open(black_box(&mut buf[..n]))
                    .expect("own datagram opens");
                black_box(r);
            })
        });
    }
    group.finish();
}

/// Datagrams sealed per iteration in `crypt_seal_flush` (one KCP flush's worth).
const FLUSH: usize = 16;

/// Sealing one flush of 1350-byte datagrams one by one (`seal`) and all together (`seal_batch`, where the
/// AES modes encrypt eight datagrams side by side), in the same run.
fn seal_flush(c: &mut Criterion) {
    let dkey: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(29) ^ 0x3C);
    let mut group = c.benchmark_group("crypt_seal_flush");
    group.throughput(Throughput::Bytes((DATAGRAM * FLUSH) as u64));
    for mode in [
        BlockMode::Aes,
        BlockMode::Aes128,
        BlockMode::Aes192,
        BlockMode::Salsa20,
    ] {
        let mut crypto = Crypto::from_derived(mode, &dkey).expect("valid key");
        crypto.set_nonce_seed(1);
        let body_len = DATAGRAM - crypto.overhead();
        let mut bufs = vec![vec![0x5Au8; DATAGRAM]; FLUSH];
        group.bench_function(BenchmarkId::new("one_by_one", mode), |b| {
            b.iter(|| {
                for buf in bufs.iter_mut() {
                    black_box(crypto.seal(buf, body_len).expect("room"));
                }
            })
        });
        group.bench_function(BenchmarkId::new("batch", mode), |b| {
            b.iter(|| {
                let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|v| &mut v[..]).collect();
                crypto.seal_batch(black_box(&mut views)).expect("room");
            })
        });
    }
    group.finish();
}

/// Bytes of block-cipher work per iteration (a multiple of both block sizes, ~ one datagram).
const BLOCK_BYTES: usize = 1344;

/// Serial CFB-style chaining (each block's input is the previous output): the seal direction.
fn chain<C: BlockEncrypt>(c: &C, buf: &mut [u8]) {
    let bs = C::block_size();
    let mut fb = Block::<C>::default();
    for chunk in buf.chunks_exact_mut(bs) {
        c.encrypt_block(&mut fb);
        for (p, k) in chunk.iter_mut().zip(fb.iter_mut()) {
            *p ^= *k;
            *k = *p;
        }
    }
}

/// Independent blocks, 8 per call: the open (CFB decryption) direction.
fn independent<C: BlockEncrypt>(c: &C, blocks: &mut [Block<C>]) {
    for group in blocks.chunks_mut(8) {
        c.encrypt_blocks(group);
    }
}

fn ours_vs_crates(c: &mut Criterion) {
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(29) ^ 0x3C);
    let k24 = GenericArray::clone_from_slice(&key[..24]);
    let mut group = c.benchmark_group("block_cipher");
    group.throughput(Throughput::Bytes(BLOCK_BYTES as u64));
    macro_rules! both {
        ($name:literal, $cipher:expr) => {{
            let cipher = $cipher;
            let mut buf = vec![0u8; BLOCK_BYTES];
            group.bench_function(concat!($name, "/chained"), |b| {
                b.iter(|| chain(&cipher, black_box(&mut buf)))
            });
            let mut blocks = vec![Default::default(); BLOCK_BYTES / block_size_of(&cipher)];
            group.bench_function(concat!($name, "/independent"), |b| {
                b.iter(|| independent(&cipher, black_box(&mut blocks)))
            });
        }};
    }
    both!("twofish-ours", Twofish::new(&key));
    both!(
        "twofish-crate",
        twofish::Twofish::new_from_slice(&key).expect("32-byte key")
    );
    both!(
        "3des-ours",
        TripleDes::new(&std::array::from_fn(|i| key[i]))
    );
    both!("3des-crate", des::TdesEde3::new(&k24));
    group.finish();
}

fn block_size_of<C: BlockEncrypt>(_: &C) -> usize {
    C::block_size()
}

criterion_group!(benches, seal_open, seal_flush, ours_vs_crates);
criterion_main!(benches);
