//! KCP core throughput: an in-memory pair (no loss, fast3, windows 2048, KCP mtu 1330) moving a bulk
//! transfer one way, ACKs flowing back. Measures bytes/s of the ARQ itself (no crypto, no I/O).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use paqet::proto::kcp::{Kcp, KcpConfig, KcpMode};

const TOTAL: usize = 16 << 20;
const RESERVED: usize = 20;

/// Datagrams in flight in one direction, stored back to back to avoid per-packet allocation.
#[derive(Default)]
struct Wire {
    bytes: Vec<u8>,
    lens: Vec<usize>,
}

impl Wire {
    fn push(&mut self, d: &[u8]) {
        self.bytes.extend_from_slice(&d[RESERVED..]);
        self.lens.push(d.len() - RESERVED);
    }
    fn deliver(&mut self, now: u32, to: &mut Kcp) {
        let mut at = 0;
        for &l in &self.lens {
            to.input(now, &self.bytes[at..at + l])
                .expect("valid datagram");
            at += l;
        }
        self.bytes.clear();
        self.lens.clear();
    }
}

fn transfer(cfg: &KcpConfig, src: &[u8], sink: &mut [u8]) -> usize {
    let mut a = Kcp::new(1, cfg, RESERVED);
    let mut b = Kcp::new(1, cfg, RESERVED);
    let (mut ab, mut ba) = (Wire::default(), Wire::default());
    let (mut sent, mut got, mut now) = (0usize, 0usize, 0u32);
    while got < TOTAL {
        if sent < TOTAL {
            sent += a.send(&src[sent..]);
        }
        a.update(now, &mut |d: &mut [u8]| ab.push(d));
        ab.deliver(now, &mut b);
        loop {
            let n = b.recv(sink);
            if n == 0 {
                break;
            }
            got += n;
        }
        b.update(now, &mut |d: &mut [u8]| ba.push(d));
        ba.deliver(now, &mut a);
        now = now.wrapping_add(1);
    }
    got
}

fn bench_kcp(c: &mut Criterion) {
    let mut cfg = KcpConfig::preset(KcpMode::Fast3);
    cfg.sndwnd = 2048;
    cfg.rcvwnd = 2048;
    cfg.mtu = 1330;
    let src: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
    let mut sink = vec![0u8; 1 << 20];
    assert_eq!(transfer(&cfg, &src, &mut sink), TOTAL);
    let mut g = c.benchmark_group("kcp");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(10);
    g.bench_function("bulk_pair_fast3_wnd2048", |bch| {
        bch.iter(|| transfer(&cfg, &src, &mut sink))
    });
    g.finish();
}

criterion_group!(benches, bench_kcp);
criterion_main!(benches);
