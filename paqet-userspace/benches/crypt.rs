//! Seal + open of one 1350-byte datagram (the default paqet MTU) for every kcp-go block mode.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use paqet::wire::crypt::{BlockMode, Crypto};
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

criterion_group!(benches, seal_open);
criterion_main!(benches);
