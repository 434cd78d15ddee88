//! Congestion control in the simulated pair: the real composed session (AES framing, KCP, smux v2) on both
//! ends, a WAN-like path with a bottleneck of rate R and a drop-tail buffer, a propagation delay, jitter
//! and seeded random loss, and an injected clock. Simulated time is deterministic, so goodput is asserted:
//! with `cc = bbr` a bulk transfer reaches at least 85 % of the bottleneck at 50 ms RTT, 1 % loss and a
//! one-BDP buffer; `cc = off` (upstream's window-limited bursts) and `cc = fixed` are recorded beside it in
//! `tests/snapshots/sim_wan.md` (rewrite with `UPDATE_SNAPSHOTS=1`; `SIM_ROW=N` runs one row only, without
//! the assertions' snapshot check being meaningful). Goodput is reported over the whole transfer and after
//! the first simulated second (start-up), which is what the WAN benchmark measures after its warm-up; the
//! assertions use the latter.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use paqet::proto::cc::{CcAlgorithm, CcConfig};
use paqet::proto::kcp::{Autotune, KcpConfig, KcpMode};
use paqet::proto::session::{Role, Session, SessionConfig};
use paqet::proto::smux::{SmuxConfig, SmuxEvent};
use paqet::wire::crypt::{BlockMode, Crypto};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Ethernet + IPv4 + TCP (timestamps) bytes around each datagram on the bottleneck.
const ENVELOPE: u64 = 66;

/// One direction of the path: random loss, then a FIFO bottleneck (rate, drop-tail buffer in bytes), then
/// the propagation delay plus a uniform jitter (which reorders datagrams sent close together).
struct Path {
    rng: SmallRng,
    loss: f64,
    rate: u64, // bytes/s on the wire
    buffer: u64,
    delay_us: u64,
    jitter_us: u64,
    busy_until: u64,
    queued: BinaryHeap<Reverse<(u64, u64)>>, // (leaves the bottleneck at, bytes)
    queued_bytes: u64,
    wire_bytes: u64,
    dropped_loss: u64,
    dropped_queue: u64,
    max_queue_delay_us: u64,
}

impl Path {
    fn new(seed: u64, loss: f64, rate: u64, buffer: u64, delay_us: u64, jitter_us: u64) -> Self {
        Path {
            rng: SmallRng::seed_from_u64(seed),
            loss,
            rate,
            buffer,
            delay_us,
            jitter_us,
            busy_until: 0,
            queued: BinaryHeap::new(),
            queued_bytes: 0,
            wire_bytes: 0,
            dropped_loss: 0,
            dropped_queue: 0,
            max_queue_delay_us: 0,
        }
    }

    /// The arrival time of a datagram sent at `now_us`, or None when it is lost or the buffer is full.
    fn send(&mut self, now_us: u64, len: usize) -> Option<u64> {
        while let Some(Reverse((t, b))) = self.queued.peek().copied() {
            if t > now_us {
                break;
            }
            self.queued.pop();
            self.queued_bytes -= b;
        }
        let bytes = len as u64 + ENVELOPE;
        self.wire_bytes += bytes;
        if self.rng.gen_bool(self.loss) {
            self.dropped_loss += 1;
            return None;
        }
        if self.queued_bytes + bytes > self.buffer {
            self.dropped_queue += 1;
            return None;
        }
        let start = self.busy_until.max(now_us);
        self.max_queue_delay_us = self.max_queue_delay_us.max(start - now_us);
        let leave = start + (bytes * 1_000_000).div_ceil(self.rate);
        self.busy_until = leave;
        self.queued.push(Reverse((leave, bytes)));
        self.queued_bytes += bytes;
        let jitter = if self.jitter_us > 0 {
            self.rng.gen_range(0..=self.jitter_us)
        } else {
            0
        };
        Some(leave + self.delay_us + jitter)
    }
}

#[derive(Clone, Copy)]
struct Scenario {
    rate_mbit: u64,
    rtt_ms: u64,
    loss: f64,
    /// Buffer in ms of the bottleneck rate.
    buffer_ms: u64,
    jitter_ms: u64,
    cc: CcConfig,
    /// Fixed windows (sndwnd = rcvwnd), or None = auto-tuned from 128 / 512 (a TOML client's default).
    window: Option<u32>,
    total: usize,
    /// Parallel downloads (streams of the one session), `total` split between them.
    streams: usize,
}

struct Outcome {
    sim_ms: u64,
    goodput_share: f64,
    /// Goodput after the first second (start-up), as the benchmark measures after its warm-up.
    steady_share: f64,
    sent_per_delivered: f64,
    dropped_loss: u64,
    dropped_queue: u64,
    retransmits: u64,
    spurious: u64,
    /// RTT of 100-byte request/echo exchanges on another stream during the transfer, minus the path's RTT
    /// (ms): the queueing delay the tunnel adds under load, p50 and p99.
    added_delay_ms: (f64, f64),
    max_queue_ms: f64,
    final_wnd: (u32, u32),
}

fn session_config(seed: u64, sc: &Scenario) -> SessionConfig {
    let mut crypto = Crypto::from_derived(BlockMode::Aes, &[9u8; 32]).expect("aes");
    crypto.set_nonce_seed(seed);
    let mut kcp = KcpConfig::preset(KcpMode::Fast3);
    match sc.window {
        Some(w) => {
            kcp.sndwnd = w;
            kcp.rcvwnd = w;
        }
        None => {
            kcp.autotune = Autotune {
                sndwnd: true,
                rcvwnd: true,
                max_wnd: 24_000,
            };
        }
    }
    kcp.cc = sc.cc;
    SessionConfig {
        crypto,
        dshard: 0,
        pshard: 0,
        kcp,
        smux: SmuxConfig::default(),
        mtu: 1350,
    }
}

/// `sc.total` bytes from the server to the client over one stream; returns the outcome in simulated time.
fn run(sc: Scenario, seed: u64) -> Outcome {
    let rate = sc.rate_mbit * 1_000_000 / 8;
    let buffer = rate * sc.buffer_ms / 1000;
    /// (arrival µs, seq, to_client, bytes)
    type InFlight = (u64, u64, bool, Vec<u8>);
    let one_way = sc.rtt_ms * 1000 / 2;
    let jitter = sc.jitter_ms * 1000;
    let mut down = Path::new(seed, sc.loss, rate, buffer, one_way, jitter);
    let mut up = Path::new(seed ^ 0x5555, sc.loss, rate, buffer, one_way, jitter);
    let mut client = Session::new(Role::Client, 0x0bad_cafe, &session_config(seed + 1, &sc), 0)
        .expect("session");
    let mut server = Session::new(Role::Server, 0x0bad_cafe, &session_config(seed + 2, &sc), 0)
        .expect("session");
    // (arrival µs, seq, to_client, bytes)
    let mut flight: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let mut seq = 0u64;
    let sids_c: Vec<u32> = (0..sc.streams)
        .map(|_| client.open_stream().expect("open"))
        .collect();
    // A request stream beside the downloads: 100 bytes every 100 ms after the first second, echoed.
    let ping_c = client.open_stream().expect("open");
    let mut ping_sent: Option<u64> = None;
    let mut ping_next = 1_000_000u64;
    let mut ping_got = 0usize;
    let mut delays: Vec<f64> = Vec::new();
    let mut sids_s: Vec<u32> = Vec::new();
    let per = sc.total / sc.streams;
    let mut written_s = vec![0usize; sc.streams];
    let payload = vec![0x5au8; 64 * 1024];
    let mut received = 0usize;
    let mut trace_at = u64::MAX;
    let mut buf = vec![0u8; 256 * 1024];
    let mut now_us = 0u64;
    let mut at_1s = None;
    let limit_us = 600 * 1_000_000;
    loop {
        let now_ms = (now_us / 1000) as u32;
        while let Some(Reverse((at, _, _, _))) = flight.peek() {
            if *at > now_us {
                break;
            }
            let Reverse((_, _, to_client, mut bytes)) = flight.pop().unwrap();
            let target = if to_client { &mut client } else { &mut server };
            target
                .handle_datagram(now_ms, &mut bytes)
                .expect("valid datagram");
        }
        while let Some(ev) = server.poll_event() {
            match ev {
                SmuxEvent::Opened(sid) => sids_s.push(sid),
                SmuxEvent::Closed(e) => panic!("server session died: {e}"),
                _ => {}
            }
        }
        for sid in sids_s.iter().skip(sc.streams) {
            loop {
                let r = server.read(*sid, &mut buf).expect("read");
                if r == 0 {
                    break;
                }
                assert_eq!(server.write(*sid, &buf[..r]).expect("echo"), r);
            }
        }
        for (i, sid) in sids_s.iter().take(sc.streams).enumerate() {
            while written_s[i] < per {
                let n = (per - written_s[i]).min(payload.len());
                let took = server.write(*sid, &payload[..n]).expect("write");
                if took == 0 {
                    break;
                }
                written_s[i] += took;
            }
        }
        while let Some(ev) = client.poll_event() {
            if let SmuxEvent::Closed(e) = ev {
                panic!("client session died: {e}");
            }
        }
        for sid in &sids_c {
            loop {
                let r = client.read(*sid, &mut buf).expect("read");
                if r == 0 {
                    break;
                }
                received += r;
            }
        }
        loop {
            let r = client.read(ping_c, &mut buf).expect("read");
            if r == 0 {
                break;
            }
            ping_got += r;
        }
        if let Some(t) = ping_sent {
            if ping_got >= 100 {
                delays.push((now_us - t) as f64 / 1000.0 - sc.rtt_ms as f64);
                ping_got -= 100;
                ping_sent = None;
            }
        }
        if ping_sent.is_none() && now_us >= ping_next {
            assert_eq!(client.write(ping_c, &[7u8; 100]).expect("request"), 100);
            ping_sent = Some(now_us);
            ping_next = now_us + 100_000;
        }
        if received >= per * sc.streams {
            break;
        }
        if at_1s.is_none() && now_us >= 1_000_000 {
            at_1s = Some(received);
        }
        assert!(
            now_us < limit_us,
            "transfer did not finish in simulated time ({received} of {})",
            sc.total
        );
        if std::env::var_os("SIM_TRACE").is_some() && now_us / 250_000 != trace_at {
            trace_at = now_us / 250_000;
            let st = server.cc_stats();
            eprintln!(
                "t={now_ms} rx={received} {} pace={} bw={} dr={} minrtt={} srtt={} cwnd={} infl={} wnd={}/{} rmt={} waitsnd={} retr={}",
                st.state, st.pacing_rate, st.btl_bw, st.delivery_rate, st.min_rtt_ms, st.srtt_ms, st.cwnd_bytes,
                st.inflight_bytes, st.sndwnd, client.cc_stats().rcvwnd, st.rmt_wnd, server.kcp().wait_snd(),
                server.kcp().stats().retrans_segs
            );
        }
        client.poll_transmit(now_ms, &mut |d| {
            if let Some(at) = up.send(now_us, d.len()) {
                seq += 1;
                flight.push(Reverse((at, seq, false, d.to_vec())));
            }
        });
        server.poll_transmit(now_ms, &mut |d| {
            if let Some(at) = down.send(now_us, d.len()) {
                seq += 1;
                flight.push(Reverse((at, seq, true, d.to_vec())));
            }
        });
        let next_ms = (now_ms + 1).max(
            client
                .poll_deadline(now_ms)
                .min(server.poll_deadline(now_ms)),
        );
        let mut next_us = next_ms as u64 * 1000;
        if let Some(Reverse((at, _, _, _))) = flight.peek() {
            next_us = next_us.min(*at);
        }
        now_us = next_us.max(now_us + 1);
    }
    let st = server.cc_stats();
    delays.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let delivered_wire = received as f64;
    Outcome {
        sim_ms: now_us / 1000,
        goodput_share: received as f64 / (now_us as f64 / 1e6) / rate as f64,
        steady_share: (received - at_1s.unwrap_or(0)) as f64
            / ((now_us as f64 - 1e6) / 1e6)
            / rate as f64,
        sent_per_delivered: server.kcp().stats().out_bytes as f64 / delivered_wire,
        dropped_loss: down.dropped_loss,
        dropped_queue: down.dropped_queue,
        retransmits: server.kcp().stats().retransmits(),
        spurious: st.spurious_retrans,
        added_delay_ms: (pct(0.5), pct(0.99)),
        max_queue_ms: down.max_queue_delay_us as f64 / 1000.0,
        final_wnd: (st.sndwnd, client.cc_stats().rcvwnd),
    }
}

fn name(cc: CcConfig) -> String {
    match cc.algorithm {
        CcAlgorithm::Fixed => format!("fixed {} Mbit/s", cc.bandwidth * 8 / 1_000_000),
        a => a.to_string(),
    }
}

#[test]
fn bbr_fills_a_lossy_bottleneck_and_off_is_recorded_beside_it() {
    let base = Scenario {
        rate_mbit: 100,
        rtt_ms: 50,
        loss: 0.01,
        buffer_ms: 50, // one BDP at 50 ms RTT
        jitter_ms: 0,
        cc: CcConfig::BBR,
        window: None,
        total: 40 << 20,
        streams: 1,
    };
    let rows: Vec<(&str, Scenario)> = vec![
        ("100 Mbit/s, 50 ms, 1 %, 1-BDP buffer", base),
        (
            "same",
            Scenario {
                cc: CcConfig::OFF,
                window: Some(2048),
                ..base
            },
        ),
        (
            "same",
            Scenario {
                cc: CcConfig::fixed(100_000_000 / 8),
                ..base
            },
        ),
        (
            "same, windows fixed at 2048",
            Scenario {
                window: Some(2048),
                ..base
            },
        ),
        ("same, no loss", Scenario { loss: 0.0, ..base }),
        (
            "same, no loss",
            Scenario {
                loss: 0.0,
                cc: CcConfig::OFF,
                window: Some(2048),
                ..base
            },
        ),
        ("same, 5 % loss", Scenario { loss: 0.05, ..base }),
        (
            "same, 5 % loss",
            Scenario {
                loss: 0.05,
                cc: CcConfig::OFF,
                window: Some(2048),
                ..base
            },
        ),
        (
            "same, 1 %, jitter 0–4 ms (reordering)",
            Scenario {
                jitter_ms: 4,
                ..base
            },
        ),
        (
            "same, no loss, jitter 0–4 ms (reordering)",
            Scenario {
                jitter_ms: 4,
                loss: 0.0,
                ..base
            },
        ),
        (
            "same, 1 %, jitter 0–4 ms (reordering)",
            Scenario {
                jitter_ms: 4,
                cc: CcConfig::OFF,
                window: Some(2048),
                ..base
            },
        ),
        (
            "20 Mbit/s, 200 ms, 1 %, 50 ms buffer",
            Scenario {
                rate_mbit: 20,
                rtt_ms: 200,
                total: 16 << 20,
                ..base
            },
        ),
        (
            "20 Mbit/s, 200 ms, 1 %, 50 ms buffer",
            Scenario {
                rate_mbit: 20,
                rtt_ms: 200,
                total: 16 << 20,
                cc: CcConfig::OFF,
                window: Some(2048),
                ..base
            },
        ),
    ];
    let mut table = String::from(
        "| path | cc | windows | simulated time | goodput / bottleneck | after 1 s | sent / delivered | random drops | buffer drops | retransmissions | spurious | max queueing | added delay p50 / p99 | final sndwnd / rcvwnd |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut results = Vec::new();
    for (i, (label, sc)) in rows.iter().enumerate() {
        if std::env::var("SIM_ROW").is_ok_and(|r| r != i.to_string()) {
            continue;
        }
        let o = run(*sc, 0x3a3a_0000 + i as u64);
        table.push_str(&format!(
            "| {label} | {} | {} | {} ms | {:.1} % | {:.1} % | {:.3} | {} | {} | {} | {} | {:.1} ms | {:.0} / {:.0} ms | {} / {} |\n",
            name(sc.cc),
            sc.window.map_or("auto".to_string(), |w| w.to_string()),
            o.sim_ms,
            o.goodput_share * 100.0,
            o.steady_share * 100.0,
            o.sent_per_delivered,
            o.dropped_loss,
            o.dropped_queue,
            o.retransmits,
            o.spurious,
            o.max_queue_ms,
            o.added_delay_ms.0,
            o.added_delay_ms.1,
            o.final_wnd.0,
            o.final_wnd.1,
        ));
        results.push(o);
    }
    let text = format!(
        "# Simulated WAN goodput (tests/sim_wan.rs)\n\nOne stream, server → client, KCP fast3, mtu 1350, aes; \
         bottleneck with a drop-tail buffer (ms of its rate), the RTT split evenly, random loss both ways.\n\n{table}"
    );
    println!("{text}");
    // The assertion: bbr ≥ 85 % of the bottleneck at 50 ms RTT, 1 % loss, one-BDP buffer.
    assert!(
        results[0].steady_share >= 0.85,
        "bbr: {:.3} of the bottleneck",
        results[0].steady_share
    );
    assert!(
        results[4].steady_share >= 0.85,
        "bbr, no loss: {:.3}",
        results[4].steady_share
    );
    assert!(
        results[6].steady_share >= 0.75,
        "bbr, 5 % loss: {:.3}",
        results[6].steady_share
    );
    // bbr beside off on the path: far ahead, and far less sent per byte delivered.
    assert!(results[0].steady_share > 1.5 * results[1].steady_share);
    // Loss recovery does not waste the link: bytes sent per byte delivered ≤ 1 + 2 × loss, plus 1 % of
    // slack: the loss here hits both directions, and a KCP sender cannot tell a lost ACK (no SACK
    // redundancy on this wire) from a lost segment while an earlier hole is being repaired.
    for (i, l) in [(0, 0.01), (4, 0.0), (6, 0.05), (8, 0.01)] {
        assert!(
            results[i].sent_per_delivered <= 1.0 + 2.0 * l + 0.01,
            "row {i}: {:.3}",
            results[i].sent_per_delivered
        );
    }
    // Queueing delay added under load (a request on another stream of the session): far below off's, and
    // at most half the path's RTT without loss (with loss every request also waits, in order, behind the
    // repair of the stream's holes: the session is one KCP byte stream).
    assert!(
        results[4].added_delay_ms.0 <= 25.0,
        "bbr adds {:?} ms",
        results[4].added_delay_ms
    );
    assert!(results[4].added_delay_ms.0 * 4.0 < results[5].added_delay_ms.0);
    // Reordering alone (jitter, no random loss) causes next to no spurious retransmission (what is
    // retransmitted there was dropped by the bottleneck during start-up; the few spurious ones are second
    // copies sent while the first was still queued behind that loss burst).
    assert!(
        results[9].spurious * 20 <= results[9].retransmits,
        "{} spurious",
        results[9].spurious
    );
    assert!(
        results[9].retransmits <= 2 * results[9].dropped_queue,
        "{} retransmissions",
        results[9].retransmits
    );
    // Auto-tuning grew the windows from 128 / 512.
    assert!(
        results[0].final_wnd.0 > 128 && results[0].final_wnd.1 > 512,
        "{:?}",
        results[0].final_wnd
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots/sim_wan.md");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(path, &text).unwrap();
        return;
    }
    let snap = std::fs::read_to_string(path)
        .unwrap_or_else(|_| panic!("missing snapshot {path}: run once with UPDATE_SNAPSHOTS=1"));
    assert_eq!(
        text, snap,
        "simulated WAN goodput changed: review, then rerun with UPDATE_SNAPSHOTS=1"
    );
}
