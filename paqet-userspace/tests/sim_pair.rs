//! A deterministic simulated client/server pair: the real composed session (AES crypto framing, KCP, smux
//! v2) on both ends, an in-memory link with a rate, a delay, jitter (reordering), duplication and random
//! loss, and an injected clock. 64 MiB go through at 0 %, 1 %, 5 % and 20 % loss, byte-exact (sha256 per
//! stream); the simulated goodput per loss rate is kept as a snapshot (`tests/snapshots/sim_goodput.md`,
//! rewrite with `UPDATE_SNAPSHOTS=1`). Everything is seeded, so the table is the same on every machine.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use paqet::proto::kcp::{KcpConfig, KcpMode};
use paqet::proto::session::{Role, Session, SessionConfig};
use paqet::proto::smux::{SmuxConfig, SmuxEvent};
use paqet::wire::crypt::{BlockMode, Crypto};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const TOTAL: usize = 64 << 20;
const STREAMS: usize = 4;
const ONE_WAY_DELAY_US: u64 = 10_000;
const JITTER_US: u64 = 3_000;
/// Share of datagrams held back by up to JITTER_US (so they arrive after later ones: reordering).
const REORDER_RATE: f64 = 0.03;
const LINK_BYTES_PER_SEC: u64 = 100_000_000; // 800 Mbit/s
const DUP_RATE: f64 = 0.01;

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at_us: u64,
    seq: u64,
    to_server: bool,
    bytes: Vec<u8>,
}

struct Link {
    rng: SmallRng,
    loss: f64,
    queue: BinaryHeap<Reverse<InFlight>>,
    busy_until: [u64; 2],
    seq: u64,
    sent: u64,
    dropped: u64,
    duplicated: u64,
}

impl Link {
    fn send(&mut self, now_us: u64, to_server: bool, bytes: &[u8]) {
        self.sent += 1;
        let dir = to_server as usize;
        let start = self.busy_until[dir].max(now_us);
        let tx_us = (bytes.len() as u64 * 1_000_000).div_ceil(LINK_BYTES_PER_SEC);
        self.busy_until[dir] = start + tx_us;
        if self.rng.gen_bool(self.loss) {
            self.dropped += 1;
            return;
        }
        let copies = if self.rng.gen_bool(DUP_RATE) { 2 } else { 1 };
        self.duplicated += copies - 1;
        for _ in 0..copies {
            let extra = if self.rng.gen_bool(REORDER_RATE) {
                self.rng.gen_range(100..=JITTER_US)
            } else {
                0
            };
            let at_us = start + tx_us + ONE_WAY_DELAY_US + extra;
            self.seq += 1;
            self.queue.push(Reverse(InFlight {
                at_us,
                seq: self.seq,
                to_server,
                bytes: bytes.to_vec(),
            }));
        }
    }
}

struct Outcome {
    sim_ms: u64,
    goodput_mbs: f64,
    datagrams: u64,
    dropped: u64,
    retransmits: u64,
}

fn config(seed: u64) -> SessionConfig {
    let mut crypto = Crypto::from_derived(BlockMode::Aes, &[7u8; 32]).expect("aes");
    crypto.set_nonce_seed(seed);
    let mut kcp = KcpConfig::preset(KcpMode::Fast3);
    kcp.sndwnd = 1024;
    kcp.rcvwnd = 1024;
    SessionConfig {
        crypto,
        dshard: 0,
        pshard: 0,
        kcp,
        smux: SmuxConfig::default(),
        mtu: 1350,
    }
}

fn run(loss: f64) -> Outcome {
    let seed = 0x5eed_0000 + (loss * 1000.0) as u64;
    let ccfg = config(seed);
    let scfg = config(seed + 1);
    let mut client = Session::new(Role::Client, 0x1234_5678, &ccfg, 0).expect("session");
    let mut server = Session::new(Role::Server, 0x1234_5678, &scfg, 0).expect("session");
    let mut link = Link {
        rng: SmallRng::seed_from_u64(seed),
        loss,
        queue: BinaryHeap::new(),
        busy_until: [0; 2],
        seq: 0,
        sent: 0,
        dropped: 0,
        duplicated: 0,
    };

    // Each stream carries TOTAL/STREAMS bytes of a seeded pseudo-random pattern.
    let per = TOTAL / STREAMS;
    let mut data_rng = SmallRng::seed_from_u64(seed ^ 0xdada);
    let payloads: Vec<Vec<u8>> = (0..STREAMS)
        .map(|_| {
            let mut v = vec![0u8; per];
            data_rng.fill_bytes(&mut v);
            v
        })
        .collect();
    let want: Vec<[u8; 32]> = payloads.iter().map(|p| Sha256::digest(p).into()).collect();
    let sids: Vec<u32> = (0..STREAMS)
        .map(|_| client.open_stream().expect("open"))
        .collect();
    let mut written = [0usize; STREAMS];
    let mut closed = [false; STREAMS];
    // Server side: sid → (hasher, bytes)
    let mut got: std::collections::BTreeMap<u32, (Sha256, usize, bool)> = Default::default();
    let mut buf = vec![0u8; 256 * 1024];

    let mut now_us: u64 = 0;
    let limit_us: u64 = 3_600 * 1_000_000; // an hour of simulated time is a hang, not slowness
    loop {
        let now_ms = (now_us / 1000) as u32;
        // Deliver everything due.
        while let Some(Reverse(p)) = link.queue.peek() {
            if p.at_us > now_us {
                break;
            }
            let Reverse(mut p) = link.queue.pop().unwrap();
            let target = if p.to_server {
                &mut server
            } else {
                &mut client
            };
            target
                .handle_datagram(now_ms, &mut p.bytes)
                .expect("valid datagram");
        }
        // Client application: write as much as flow control takes; close when done.
        for i in 0..STREAMS {
            while written[i] < per {
                let n = client
                    .write(sids[i], &payloads[i][written[i]..])
                    .expect("write");
                if n == 0 {
                    break;
                }
                written[i] += n;
            }
            if written[i] == per && !closed[i] {
                client.close_stream(sids[i]);
                closed[i] = true;
            }
        }
        // Server application: read everything.
        while let Some(ev) = server.poll_event() {
            match ev {
                SmuxEvent::Opened(sid) => {
                    got.entry(sid).or_insert_with(|| (Sha256::new(), 0, false));
                }
                SmuxEvent::Closed(e) => panic!("server session died: {e}"),
                _ => {}
            }
        }
        for (sid, (h, n, fin)) in got.iter_mut() {
            loop {
                let r = server.read(*sid, &mut buf).expect("read");
                if r == 0 {
                    break;
                }
                h.update(&buf[..r]);
                *n += r;
            }
            if !*fin && server.is_fin(*sid) {
                *fin = true;
            }
        }
        while let Some(ev) = client.poll_event() {
            if let SmuxEvent::Closed(e) = ev {
                panic!("client session died: {e}");
            }
        }
        client.poll_transmit(now_ms, &mut |d| link.send(now_us, true, d));
        server.poll_transmit(now_ms, &mut |d| link.send(now_us, false, d));

        let done = got.len() == STREAMS && got.values().all(|(_, n, fin)| *n == per && *fin);
        if done {
            break;
        }
        assert!(
            now_us < limit_us,
            "transfer at loss {loss} did not finish in simulated time"
        );
        // Next event: a delivery or a session deadline (at least 1 ms ahead for timers).
        let next_ms = (now_ms + 1).max(
            client
                .poll_deadline(now_ms)
                .min(server.poll_deadline(now_ms)),
        );
        let mut next_us = next_ms as u64 * 1000;
        if let Some(Reverse(p)) = link.queue.peek() {
            next_us = next_us.min(p.at_us);
        }
        now_us = next_us.max(now_us + 1);
    }
    for (i, (sid, (h, n, _))) in got.into_iter().enumerate() {
        assert_eq!(n, per, "stream {sid}: byte count");
        let digest: [u8; 32] = h.finalize().into();
        assert_eq!(
            digest, want[i],
            "stream {sid}: sha256 differs (loss {loss})"
        );
    }
    let sim_ms = now_us / 1000;
    Outcome {
        sim_ms,
        goodput_mbs: TOTAL as f64 / (now_us as f64 / 1e6) / 1e6,
        datagrams: link.sent,
        dropped: link.dropped,
        retransmits: client.kcp().stats().retransmits(),
    }
}

#[test]
fn sixty_four_mib_through_lossy_reordering_duplicating_link() {
    let mut table = String::from(
        "| loss | simulated time | goodput | datagrams sent | dropped | KCP retransmissions (client) |\n|---|---|---|---|---|---|\n",
    );
    for loss in [0.0, 0.01, 0.05, 0.20] {
        let o = run(loss);
        table.push_str(&format!(
            "| {:.0} % | {} ms | {:.1} MB/s | {} | {} | {} |\n",
            loss * 100.0,
            o.sim_ms,
            o.goodput_mbs,
            o.datagrams,
            o.dropped,
            o.retransmits
        ));
    }
    let header = format!(
        "# Simulated goodput, 64 MiB in {STREAMS} streams, client → server\n\nKCP fast3, windows 1024/1024, mtu 1350, aes; link {} Mbit/s, {} ms one way; {:.0} % of datagrams held back up to {} ms (reordered); {:.0} % duplicated.\n\n",
        LINK_BYTES_PER_SEC * 8 / 1_000_000,
        ONE_WAY_DELAY_US / 1000,
        REORDER_RATE * 100.0,
        JITTER_US / 1000,
        DUP_RATE * 100.0
    );
    let text = header + &table;
    println!("{text}");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/snapshots/sim_goodput.md"
    );
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots")).unwrap();
        std::fs::write(path, &text).unwrap();
        return;
    }
    let snap = std::fs::read_to_string(path)
        .unwrap_or_else(|_| panic!("missing snapshot {path}: run once with UPDATE_SNAPSHOTS=1"));
    assert_eq!(
        text, snap,
        "simulated goodput changed: review, then rerun with UPDATE_SNAPSHOTS=1"
    );
}
