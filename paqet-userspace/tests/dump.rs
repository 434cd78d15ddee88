//! `tools::dump` against the upstream alpha.21 reference captures.
use paqet::tools::dump::Dumper;
use paqet::util::pcapfile::PcapFile;
use paqet::wire::crypt::{BlockMode, Crypto};

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/testdata/upstream-alpha21"
);
const KEY: &str = "0edb843fa5d512bbb688b437e6035b4965731b527bf229f2eed94185f23a3740";

/// Describes every frame of `name`.pcap; returns one block per frame.
fn describe_all(name: &str, crypto: Crypto, fec: Option<(usize, usize)>) -> Vec<String> {
    let bytes = std::fs::read(format!("{DIR}/{name}.pcap")).expect("capture present");
    let file = PcapFile::parse(&bytes).expect("valid pcap");
    let mut d = Dumper::new(Some(crypto), fec, 9999);
    file.records
        .iter()
        .map(|r| d.describe(r.ts_micros, r.data))
        .collect()
}

fn check_capture(name: &str, conv: &str, fec: Option<(usize, usize)>) {
    let blocks = describe_all(name, Crypto::new(BlockMode::Aes, KEY).unwrap(), fec);
    assert!(!blocks.is_empty());
    for b in &blocks {
        assert!(
            b.contains("crypto aes: crc ok"),
            "{name}: frame not authenticated:\n{b}"
        );
        assert!(b.contains(":9999"), "{name}: tunnel port missing:\n{b}");
        assert!(b.contains("TCP PA"), "{name}: flags missing:\n{b}");
    }
    let all = blocks.concat();
    assert!(
        all.contains(&format!("kcp conv={conv} PUSH sn=0 ")),
        "{name}: first PUSH missing"
    );
    assert!(
        all.contains(&format!("kcp conv={conv} ACK ")),
        "{name}: ACKs missing"
    );
    // Session start: SYN, PSH with PTCPF ["PA"], FIN on stream 3, all in the first frame.
    assert!(
        blocks[0].contains("smux Syn sid=3 len=0"),
        "{name}:\n{}",
        blocks[0]
    );
    assert!(
        blocks[0].contains("smux Psh sid=3 len=8 paqet PTCPF [PA]"),
        "{name}:\n{}",
        blocks[0]
    );
    assert!(
        blocks[0].contains("smux Fin sid=3 len=0"),
        "{name}:\n{}",
        blocks[0]
    );
    // The CONNECT and the UDP stream, the UDP echo, the window updates.
    assert!(
        all.contains("paqet PTCP 127.0.0.1:8000"),
        "{name}: PTCP header missing"
    );
    assert!(
        all.contains("paqet PUDP 127.0.0.1:5300"),
        "{name}: PUDP header missing"
    );
    assert!(
        all.contains("smux Upd sid=9 len=8 consumed="),
        "{name}: UPD missing"
    );
    // Every stream the client opened shows its SYN (7 SYNs, sids 3..=15).
    for sid in [3, 5, 7, 9, 11, 13, 15] {
        assert!(
            all.contains(&format!("smux Syn sid={sid} len=0")),
            "{name}: SYN of sid {sid} missing"
        );
    }
    // The reply is 9 PSH frames on sid 9; with the in-order reassembly each is found where it starts.
    let reply_frames = all.matches("smux Psh sid=9 len=").count();
    assert_eq!(
        reply_frames,
        2 + 9,
        "{name}: PSH frames of sid 9 (2 client + 9 server)"
    );
    // Nothing was undecodable.
    assert!(
        !all.contains("smux: smux frame"),
        "{name}: smux decode error:\n{all}"
    );
}

#[test]
fn fast_capture_decodes_every_layer() {
    check_capture("fast", "552f9463", None);
}

#[test]
fn fec_capture_decodes_every_layer() {
    check_capture("fec", "f2c0d581", Some((10, 3)));
    let all = describe_all(
        "fec",
        Crypto::new(BlockMode::Aes, KEY).unwrap(),
        Some((10, 3)),
    )
    .concat();
    assert_eq!(all.matches(" parity ").count(), 18, "18 parity packets");
    assert!(all.contains("fec seqid=0 data (group 0, shard 0)"));
    assert!(
        all.contains("(retransmission: sn"),
        "the 3 retransmitted server segments are flagged"
    );
}

#[test]
fn wrong_key_fails_every_crypto_check() {
    for name in ["fast", "fec"] {
        let wrong = Crypto::new(BlockMode::Aes, "not-the-key").unwrap();
        for b in describe_all(name, wrong, None) {
            assert!(
                b.contains("crypto check failed (CRC mismatch)"),
                "{name}:\n{b}"
            );
            assert!(
                !b.contains("kcp conv="),
                "{name}: decoded with a wrong key:\n{b}"
            );
            assert!(b.contains("    00000000  "), "{name}: no hex dump:\n{b}");
        }
    }
}

#[test]
fn random_and_mutated_frames_never_panic() {
    use rand::{Rng, SeedableRng};
    let bytes = std::fs::read(format!("{DIR}/fast.pcap")).unwrap();
    let file = PcapFile::parse(&bytes).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for mode in [BlockMode::Aes, BlockMode::Null, BlockMode::Aes128Gcm] {
        let mut d = Dumper::new(Some(Crypto::new(mode, KEY).unwrap()), Some((10, 3)), 9999);
        for i in 0..3000usize {
            let mut frame = if i % 2 == 0 {
                let len = rng.gen_range(0..1600);
                (0..len).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                file.records[i % file.records.len()].data.to_vec()
            };
            // Flip a few bytes and maybe truncate.
            for _ in 0..rng.gen_range(0..4) {
                if !frame.is_empty() {
                    let at = rng.gen_range(0..frame.len());
                    frame[at] = rng.gen();
                }
            }
            if rng.gen_bool(0.3) {
                let keep = rng.gen_range(0..=frame.len());
                frame.truncate(keep);
            }
            let s = d.describe(i as u64, &frame);
            assert!(s.starts_with('[') && s.ends_with('\n'));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Per-flow congestion figures on built frames (no crypto: the payload is the KCP body).
// ------------------------------------------------------------------------------------------------

mod cc {
    use std::net::SocketAddr;

    use paqet::tools::dump::{Dumper, FlowSummary, MAX_PENDING_PUSH};
    use paqet::wire::envelope::{EnvelopeBuilder, TcpFlags};
    use paqet::wire::kcp::{Cmd, SegmentHeader};

    const CONV: u32 = 0xabcd;
    const MS: u64 = 1000;

    fn client() -> SocketAddr {
        "10.0.0.1:40000".parse().unwrap()
    }

    fn server() -> SocketAddr {
        "10.0.0.2:9999".parse().unwrap()
    }

    /// Builds frames of one capture and feeds them to a dumper, collecting its output.
    struct Capture {
        dumper: Dumper,
        out: String,
        c2s: EnvelopeBuilder,
        s2c: EnvelopeBuilder,
    }

    impl Capture {
        fn new() -> Self {
            let (cm, sm) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
            Capture {
                dumper: Dumper::new(None, None, 9999),
                out: String::new(),
                c2s: EnvelopeBuilder::new(cm, sm, client(), server(), 1).unwrap(),
                s2c: EnvelopeBuilder::new(sm, cm, server(), client(), 2).unwrap(),
            }
        }

        /// One frame at `t_us` carrying `segs` (header, data length) from the client (`from_client`) or
        /// the server. PUSH data is one smux PSH frame on stream 3.
        fn frame(&mut self, t_us: u64, from_client: bool, segs: &[(SegmentHeader, usize)]) {
            let mut body = Vec::new();
            for (h, len) in segs {
                let mut hdr = [0u8; 24];
                let mut h = *h;
                h.len = *len as u32;
                h.emit(&mut hdr);
                body.extend_from_slice(&hdr);
                if *len >= 8 {
                    body.extend_from_slice(&[2, 2]);
                    body.extend_from_slice(&((*len - 8) as u16).to_le_bytes());
                    body.extend_from_slice(&3u32.to_le_bytes());
                    body.extend(std::iter::repeat_n(0x61, *len - 8));
                } else {
                    body.extend(std::iter::repeat_n(0, *len));
                }
            }
            let env = if from_client {
                &mut self.c2s
            } else {
                &mut self.s2c
            };
            let mut frame = vec![0u8; 128 + body.len()];
            let n = env
                .emit_with_payload(TcpFlags::PSH_ACK, &body, &mut frame)
                .unwrap();
            let text = self.dumper.describe(t_us, &frame[..n]);
            self.out.push_str(&text);
        }

        fn push(&mut self, t_us: u64, sn: u32, ts: u32, len: usize) {
            let h = seg(Cmd::Push, sn, ts, 0, 128);
            self.frame(t_us, true, &[(h, len)]);
        }

        fn ack(&mut self, t_us: u64, sn: u32, ts: u32, una: u32) {
            let h = seg(Cmd::Ack, sn, ts, una, 256);
            self.frame(t_us, false, &[(h, 0)]);
        }

        fn summary(&self, src: SocketAddr) -> FlowSummary {
            self.dumper
                .flow_summaries()
                .into_iter()
                .find(|f| f.src == src)
                .expect("flow summary")
        }
    }

    fn seg(cmd: Cmd, sn: u32, ts: u32, una: u32, wnd: u16) -> SegmentHeader {
        SegmentHeader {
            conv: CONV,
            cmd,
            frg: 0,
            wnd,
            ts,
            sn,
            una,
            len: 0,
        }
    }

    /// Lines of `out` containing `pat`.
    fn lines<'a>(out: &'a str, pat: &str) -> Vec<&'a str> {
        out.lines().filter(|l| l.contains(pat)).collect()
    }

    /// Two seconds of a client upload:
    /// - second 0: PUSH sn 0..=9 every 50 ms (1000 bytes), each ACKed 20 ms later; sn 5 retransmitted at
    ///   600 ms and ACKed (echoing the retransmission's ts) 40 ms later;
    /// - second 1: PUSH sn 10..=14 every 100 ms (500 bytes), ACKed 10 ms later except sn 12 (its ACK is
    ///   lost; the ACK of 13 carries una 14); sn 12 retransmitted at 1500 ms, its ACK echoes the first
    ///   transmission's ts (no RTT sample);
    /// - an ACK-only frame at 2200 ms ends second 1.
    fn upload() -> Capture {
        let mut c = Capture::new();
        for i in 0..10u32 {
            let t = u64::from(i) * 50 * MS;
            c.push(t, i, 5000 + i * 50, 1000);
            c.ack(t + 20 * MS, i, 5000 + i * 50, i + 1);
        }
        c.push(600 * MS, 5, 5600, 1000);
        c.ack(640 * MS, 5, 5600, 10);
        for i in 10..15u32 {
            let t = 1000 * MS + u64::from(i - 10) * 100 * MS;
            c.push(t, i, 6000 + i * 100, 500);
            if i != 12 {
                c.ack(t + 10 * MS, i, 6000 + i * 100, i + 1);
            }
        }
        c.push(1500 * MS, 12, 7500, 500);
        c.ack(1510 * MS, 12, 6000 + 12 * 100, 15);
        c.ack(2200 * MS, 14, 6000 + 14 * 100, 15);
        c
    }

    #[test]
    fn periodic_summaries_report_rate_rtt_retransmissions_and_windows() {
        let c = upload();
        let up = lines(&c.out, "summary 10.0.0.1:40000 -> 10.0.0.2:9999");
        assert_eq!(up.len(), 2, "one line per second with data:\n{}", c.out);
        assert_eq!(
            up[0],
            "[00:00:01.000000] summary 10.0.0.1:40000 -> 10.0.0.2:9999 conv=0000abcd | 1.000 s | data 11000 B/s, \
             11 segs | retrans 1/11 (9.1 %) | rtt 21.818 ms (min 20.000, max 40.000, 11 samples) | wnd 128, peer wnd 256"
        );
        assert_eq!(
            up[1],
            "[00:00:02.000000] summary 10.0.0.1:40000 -> 10.0.0.2:9999 conv=0000abcd | 1.000 s | data 3000 B/s, \
             6 segs | retrans 1/6 (16.7 %) | rtt 10.000 ms (min 10.000, max 10.000, 4 samples) | wnd 128, peer wnd 256"
        );
        // The summary of second 0 comes before the first frame of second 1.
        let at = c.out.find("[00:00:01.000000] summary").unwrap();
        assert!(
            c.out[at..]
                .lines()
                .nth(2)
                .unwrap()
                .starts_with("[00:00:01.000000] 10.0.0.1:40000 -> "),
            "{}",
            c.out
        );
        // The ACK direction: no data, its advertised window and ours.
        let down = lines(&c.out, "summary 10.0.0.2:9999 -> 10.0.0.1:40000");
        assert_eq!(down.len(), 2);
        assert!(
            down[0].ends_with("data 0 B/s, 0 segs | retrans 0/0 | rtt - | wnd 256, peer wnd 128"),
            "{}",
            down[0]
        );
    }

    #[test]
    fn totals_at_the_end() {
        let mut c = upload();
        let f = c.summary(client());
        assert_eq!((f.dst, f.conv), (server(), CONV));
        assert_eq!(f.push_segments, 17);
        assert_eq!(f.retrans_segments, 2);
        assert_eq!(f.push_bytes, 11 * 1000 + 6 * 500);
        assert_eq!(f.rtt_samples, 15);
        assert_eq!(
            (f.rtt_min_micros, f.rtt_avg_micros, f.rtt_max_micros),
            (10_000, 280_000 / 15, 40_000)
        );
        assert_eq!((f.wnd, f.peer_wnd), (Some(128), Some(256)));
        assert_eq!((f.first_micros, f.last_micros), (0, 1_500_000));
        assert!((f.data_rate().unwrap() - 14_000.0 / 1.5).abs() < 1e-6);
        assert!((f.retrans_ratio() - 2.0 / 17.0).abs() < 1e-12);
        let back = c.summary(server());
        assert_eq!(
            (back.push_segments, back.segments, back.rtt_samples),
            (0, 17, 0)
        );
        let end = c.dumper.finish();
        // The partial last interval (one ACK) and the totals, stamped with the last frame's time.
        let partial = lines(&end, "] summary 10.0.0.2:9999");
        assert_eq!(partial.len(), 1, "{end}");
        let want =
            "[00:00:02.200000] summary 10.0.0.2:9999 -> 10.0.0.1:40000 conv=0000abcd | 0.200 s";
        assert!(partial[0].starts_with(want), "{end}");
        let total = lines(&end, "summary total 10.0.0.1:40000");
        assert_eq!(
            total,
            vec![
                "[00:00:02.200000] summary total 10.0.0.1:40000 -> 10.0.0.2:9999 conv=0000abcd | 1.500 s | data 9333 B/s, \
                 17 segs | retrans 2/17 (11.8 %) | rtt 18.666 ms (min 10.000, max 40.000, 15 samples) | wnd 128, peer wnd 256"
            ],
            "{end}"
        );
        assert_eq!(lines(&end, "summary total").len(), 2, "{end}");
    }

    #[test]
    fn summaries_can_be_turned_off() {
        let mut c = Capture::new();
        c.dumper.set_summary_interval(None);
        for i in 0..5u32 {
            c.push(u64::from(i) * 700 * MS, i, i, 100);
        }
        assert!(!c.out.contains("summary"), "{}", c.out);
        let end = c.dumper.finish();
        assert_eq!(lines(&end, "summary").len(), 1, "only the totals: {end}");
        assert!(
            end.contains("summary total 10.0.0.1:40000 -> 10.0.0.2:9999"),
            "{end}"
        );
    }

    #[test]
    fn retransmissions_across_the_sn_wrap_and_beyond_the_history() {
        let mut c = Capture::new();
        for (i, sn) in [u32::MAX - 1, u32::MAX, 0, 1, u32::MAX, 0, 2]
            .into_iter()
            .enumerate()
        {
            c.push(i as u64 * MS, sn, 0, 10);
        }
        assert_eq!(c.summary(client()).retrans_segments, 2, "{}", c.out);
        // Jump far ahead: everything the history forgot counts as a retransmission, newer sns do not.
        c.push(10 * MS, 100_000, 0, 10);
        c.push(11 * MS, 3, 0, 10);
        c.push(12 * MS, 99_999, 0, 10);
        c.push(13 * MS, 99_999, 0, 10);
        let f = c.summary(client());
        assert_eq!((f.push_segments, f.retrans_segments), (11, 4), "{}", c.out);
    }

    #[test]
    fn pending_pushes_are_bounded_and_retired_by_una() {
        let mut c = Capture::new();
        let n = MAX_PENDING_PUSH as u32 + 100;
        for sn in 0..n {
            c.push(u64::from(sn) * MS, sn, sn, 10);
        }
        // Only the first MAX_PENDING_PUSH transmissions are timed: an ACK of a later one gives no sample.
        c.ack(500 * MS, n - 1, n - 1, 0);
        assert_eq!(c.summary(client()).rtt_samples, 0);
        c.ack(501 * MS, 1, 1, 0);
        assert_eq!(c.summary(client()).rtt_samples, 1);
        assert_eq!(c.summary(client()).rtt_max_micros, 500 * MS);
        // una = n retires every timed transmission (their own ACKs were lost): later ACKs give nothing,
        // and new transmissions are timed again.
        c.ack(502 * MS, n - 2, n - 2, n);
        c.ack(503 * MS, 2, 2, n);
        assert_eq!(c.summary(client()).rtt_samples, 1);
        c.push(600 * MS, n, 77, 10);
        c.ack(605 * MS, n, 77, n + 1);
        let f = c.summary(client());
        assert_eq!((f.rtt_samples, f.rtt_min_micros), (2, 5 * MS));
    }

    #[test]
    fn many_convs_keep_the_flow_table_bounded() {
        let mut c = Capture::new();
        for conv in 0..10_000u32 {
            let h = SegmentHeader {
                conv,
                ..seg(Cmd::Push, 0, 0, 0, 1)
            };
            c.frame(u64::from(conv), true, &[(h, 8)]);
        }
        let flows = c.dumper.flow_summaries();
        assert!(
            !flows.is_empty() && flows.len() <= 4096,
            "{} flows",
            flows.len()
        );
    }
}

/// The reference captures' figures: the upload and download of one session, RTTs from real ACKs, the fec
/// capture's three retransmitted server segments.
#[test]
fn capture_flow_summaries() {
    for (name, fec, retrans) in [("fast", None, 0), ("fec", Some((10, 3)), 3)] {
        let bytes = std::fs::read(format!("{DIR}/{name}.pcap")).expect("capture present");
        let file = PcapFile::parse(&bytes).expect("valid pcap");
        let mut d = Dumper::new(Some(Crypto::new(BlockMode::Aes, KEY).unwrap()), fec, 9999);
        for r in &file.records {
            d.describe(r.ts_micros, r.data);
        }
        let flows = d.flow_summaries();
        assert_eq!(flows.len(), 2, "{name}: {flows:?}");
        let down = flows
            .iter()
            .find(|f| f.src.port() == 9999)
            .expect("server flow");
        let up = flows
            .iter()
            .find(|f| f.dst.port() == 9999)
            .expect("client flow");
        assert!(down.push_bytes >= 65_536, "{name}: {down:?}");
        assert_eq!(down.retrans_segments, retrans, "{name}: {down:?}");
        assert!(
            down.rtt_samples > 0 && down.rtt_min_micros <= down.rtt_max_micros,
            "{name}: {down:?}"
        );
        assert!(
            up.push_segments > 0 && up.peer_wnd.is_some() && down.peer_wnd.is_some(),
            "{name}: {up:?}"
        );
        let end = d.finish();
        assert_eq!(end.matches("summary total").count(), 2, "{name}:\n{end}");
    }
}

/// `frame` (Ethernet, IPv4, TCP) with `prefix` inserted in front of its TCP payload (IP length and
/// checksum fixed; the dumper does not check the TCP checksum).
fn with_prefix(frame: &[u8], prefix: &[u8]) -> Vec<u8> {
    assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4 capture");
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let doff = usize::from(frame[14 + ihl + 12] >> 4) * 4;
    let at = 14 + ihl + doff;
    let mut f = frame[..at].to_vec();
    f.extend_from_slice(prefix);
    f.extend_from_slice(&frame[at..]);
    let total = u16::from_be_bytes([f[16], f[17]]) + prefix.len() as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let mut sum = 0u32;
    for c in f[14..14 + ihl].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f
}

/// A guarded capture (the reference capture with the guard prefix each sender would have written) is
/// decoded when the dumper knows the guard, in both formats; a dumper with another binding or key sees
/// the guard fail and decrypts nothing.
#[test]
fn guarded_captures_decode_with_the_key() {
    use paqet::proto::guard::{tag_of, Addressing, Guard, GuardBind, GuardConfig};
    use paqet::wire::envelope::{parse_frame_on, Medium};
    let bytes = std::fs::read(format!("{DIR}/fast.pcap")).expect("capture present");
    let file = PcapFile::parse(&bytes).expect("valid pcap");
    let gkey_guard = |cfg: GuardConfig, key: &str| Guard::new(cfg, key);
    for (cfg, label) in [
        (GuardConfig::tag(GuardBind::Port), "tag"),
        (GuardConfig::tag(GuardBind::FourTuple), "tag"),
        (GuardConfig::cookie(*b"PQT1", 30, 1), "cookie"),
    ] {
        let mut sender = gkey_guard(cfg.clone(), KEY);
        let frames: Vec<(u64, Vec<u8>)> = file
            .records
            .iter()
            .map(|r| {
                let p = parse_frame_on(Medium::Ethernet, r.data, None).expect("tunnel frame");
                let at = Addressing {
                    src: p.src_addr(),
                    dst: p.dst_addr(),
                    to_server: p.dst_port == 9999,
                };
                let mut prefix = vec![0u8; sender.prefix_len()];
                sender.write_prefix(r.ts_micros / 1_000_000, &at, p.payload, &mut prefix);
                if label == "tag" {
                    assert_eq!(
                        prefix,
                        tag_of(&sender.tag_key(), cfg.bind, &at, p.payload),
                        "the tag is tag_of"
                    );
                }
                (r.ts_micros, with_prefix(r.data, &prefix))
            })
            .collect();
        let run = |guard: Option<Guard>| -> Vec<String> {
            let mut d = Dumper::new(Some(Crypto::new(BlockMode::Aes, KEY).unwrap()), None, 9999);
            d.set_guard(guard);
            frames.iter().map(|(t, f)| d.describe(*t, f)).collect()
        };
        let blocks = run(Some(gkey_guard(cfg.clone(), KEY)));
        for b in &blocks {
            assert!(b.contains(&format!("guard {label}: ok")), "{cfg:?}:\n{b}");
            assert!(b.contains("crypto aes: crc ok"), "{cfg:?}:\n{b}");
        }
        assert!(blocks.concat().contains("paqet PTCP 127.0.0.1:8000"));
        // Without the guard the prefix breaks the crypto check (what `dump` printed before).
        for b in run(None) {
            assert!(
                !b.contains("kcp conv="),
                "{cfg:?}: decoded without the guard:\n{b}"
            );
        }
        // Another key, or (tag) another binding: the guard fails and nothing is decrypted.
        let mut others = vec![gkey_guard(cfg.clone(), "another-key")];
        if label == "tag" {
            let other = if cfg.bind == GuardBind::Port {
                GuardBind::FourTuple
            } else {
                GuardBind::None
            };
            others.push(gkey_guard(GuardConfig::tag(other), KEY));
        }
        for g in others {
            for b in run(Some(g)) {
                assert!(
                    b.contains(&format!("guard {label}: no valid")),
                    "{cfg:?}:\n{b}"
                );
                assert!(!b.contains("kcp conv="), "{cfg:?}:\n{b}");
            }
        }
    }
}
