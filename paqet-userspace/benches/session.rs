//! The whole in-memory pipeline on ONE core: client session (smux framing → KCP → crypto seal) and server
//! session (crypto open → KCP → smux → stream read) on the same thread, one bulk stream, no loss, KCP fast3
//! with 2048-packet windows, mtu 1350. The reported throughput is stream bytes per second with both ends'
//! work charged to one core (so each end alone is faster).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use paqet::proto::kcp::{KcpConfig, KcpMode};
use paqet::proto::session::{Role, Session, SessionConfig};
use paqet::proto::smux::{SmuxConfig, SmuxEvent};
use paqet::wire::crypt::{BlockMode, Crypto};

const TOTAL: usize = 32 << 20;

fn config(block: BlockMode) -> SessionConfig {
    let crypto = Crypto::from_derived(block, &[9u8; 32]).unwrap();
    let mut kcp = KcpConfig::preset(KcpMode::Fast3);
    kcp.sndwnd = 2048;
    kcp.rcvwnd = 2048;
    SessionConfig {
        crypto,
        dshard: 0,
        pshard: 0,
        kcp,
        smux: SmuxConfig::default(),
        mtu: 1350,
    }
}

/// Moves TOTAL bytes client → server; returns bytes received.
fn transfer(cfg: &SessionConfig, src: &[u8], sink: &mut [u8], wire: &mut Vec<Vec<u8>>) -> usize {
    let mut c = Session::new(Role::Client, 7, cfg, 0).expect("session");
    let mut s = Session::new(Role::Server, 7, cfg, 0).expect("session");
    let sid = c.open_stream().unwrap();
    let (mut sent, mut got, mut now) = (0usize, 0usize, 0u32);
    let mut rsid = None;
    let mut back: Vec<Vec<u8>> = Vec::new();
    while got < TOTAL {
        if sent < TOTAL {
            sent += c.write(sid, &src[sent..]).unwrap();
        }
        c.poll_transmit(now, &mut |d| wire.push(d.to_vec()));
        for mut d in wire.drain(..) {
            s.handle_datagram(now, &mut d).unwrap();
        }
        while let Some(ev) = s.poll_event() {
            if let SmuxEvent::Opened(id) = ev {
                rsid = Some(id);
            }
        }
        if let Some(id) = rsid {
            loop {
                let n = s.read(id, sink).unwrap();
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        s.poll_transmit(now, &mut |d| back.push(d.to_vec()));
        for mut d in back.drain(..) {
            c.handle_datagram(now, &mut d).unwrap();
        }
        now = now.wrapping_add(1);
    }
    got
}

fn bench_session(c: &mut Criterion) {
    let src: Vec<u8> = (0..TOTAL).map(|i| (i * 31 % 251) as u8).collect();
    let mut sink = vec![0u8; 1 << 20];
    let mut g = c.benchmark_group("session_pipeline");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(10);
    for block in [
        BlockMode::Aes,
        BlockMode::Aes128,
        BlockMode::Salsa20,
        BlockMode::None,
        BlockMode::Null,
    ] {
        let cfg = config(block);
        let mut wire = Vec::with_capacity(4096);
        g.bench_function(block.as_str(), |b| {
            b.iter(|| assert_eq!(transfer(&cfg, &src, &mut sink, &mut wire), TOTAL))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_session);
criterion_main!(benches);
