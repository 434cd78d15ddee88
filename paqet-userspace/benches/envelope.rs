//! Envelope codec throughput: build the Ethernet/IPv4/TCP headers (both checksums) in front of a 1350-byte
//! payload, then parse the frame back, as the per-packet TX and RX paths do.
use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use paqet::wire::envelope::{ones_complement_sum, parse_frame, EnvelopeBuilder, TcpFlags};

const PAYLOAD_LEN: usize = 1350;

fn builder(src: &str, dst: &str) -> EnvelopeBuilder {
    let src: SocketAddr = src.parse().expect("bench source address");
    let dst: SocketAddr = dst.parse().expect("bench destination address");
    EnvelopeBuilder::new(
        [2, 0, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 2],
        src,
        dst,
        0x23A6_FCF5,
    )
    .expect("same family")
}

fn bench_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Bytes(PAYLOAD_LEN as u64));
    for (name, src, dst) in [
        ("ipv4", "10.200.0.1:35748", "10.200.0.2:9999"),
        ("ipv6", "[fd00::1]:35748", "[fd00::2]:9999"),
    ] {
        let mut b = builder(src, dst);
        let hdr = b.header_len(TcpFlags::PSH_ACK);
        let mut frame = vec![0u8; hdr + PAYLOAD_LEN];
        for (i, x) in frame[hdr..].iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        group.bench_function(format!("emit_{name}_1350"), |bench| {
            bench.iter(|| {
                b.emit(
                    black_box(TcpFlags::PSH_ACK),
                    black_box(PAYLOAD_LEN),
                    &mut frame,
                )
                .expect("fits")
            })
        });
        group.bench_function(format!("parse_{name}_1350"), |bench| {
            bench.iter(|| {
                parse_frame(black_box(&frame), Some(9999))
                    .expect("valid frame")
                    .payload
                    .len()
            })
        });
        group.bench_function(format!("emit_parse_{name}_1350"), |bench| {
            bench.iter(|| {
                let n = b
                    .emit(TcpFlags::PSH_ACK, PAYLOAD_LEN, &mut frame)
                    .expect("fits");
                parse_frame(black_box(&frame[..n]), Some(9999))
                    .expect("valid frame")
                    .payload
                    .len()
            })
        });
    }
    let data = vec![0xA5u8; PAYLOAD_LEN];
    group.bench_function("ones_complement_sum_1350", |bench| {
        bench.iter(|| ones_complement_sum(black_box(&data)))
    });
    group.finish();
}

criterion_group!(benches, bench_envelope);
criterion_main!(benches);
