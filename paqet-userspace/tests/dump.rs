//! `tools::dump` against the upstream alpha.21 reference captures.
use paqet::tools::dump::Dumper;
use paqet::util::pcapfile::PcapFile;
use paqet::wire::crypt::{BlockMode, Crypto};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/upstream-alpha21");
const KEY: &str = "0edb843fa5d512bbb688b437e6035b4965731b527bf229f2eed94185f23a3740";

/// Describes every frame of `name`.pcap; returns one block per frame.
fn describe_all(name: &str, crypto: Crypto, fec: Option<(usize, usize)>) -> Vec<String> {
    let bytes = std::fs::read(format!("{DIR}/{name}.pcap")).expect("capture present");
    let file = PcapFile::parse(&bytes).expect("valid pcap");
    let mut d = Dumper::new(Some(crypto), fec, 9999);
    file.records.iter().map(|r| d.describe(r.ts_micros, r.data)).collect()
}

fn check_capture(name: &str, conv: &str, fec: Option<(usize, usize)>) {
    let blocks = describe_all(name, Crypto::new(BlockMode::Aes, KEY).unwrap(), fec);
    assert!(!blocks.is_empty());
    for b in &blocks {
        assert!(b.contains("crypto aes: crc ok"), "{name}: frame not authenticated:\n{b}");
        assert!(b.contains(":9999"), "{name}: tunnel port missing:\n{b}");
        assert!(b.contains("TCP PA"), "{name}: flags missing:\n{b}");
    }
    let all = blocks.concat();
    assert!(all.contains(&format!("kcp conv={conv} PUSH sn=0 ")), "{name}: first PUSH missing");
    assert!(all.contains(&format!("kcp conv={conv} ACK ")), "{name}: ACKs missing");
    // Session start: SYN, PSH with PTCPF ["PA"], FIN on stream 3, all in the first frame.
    assert!(blocks[0].contains("smux Syn sid=3 len=0"), "{name}:\n{}", blocks[0]);
    assert!(blocks[0].contains("smux Psh sid=3 len=8 paqet PTCPF [PA]"), "{name}:\n{}", blocks[0]);
    assert!(blocks[0].contains("smux Fin sid=3 len=0"), "{name}:\n{}", blocks[0]);
    // The CONNECT and the UDP stream, the UDP echo, the window updates.
    assert!(all.contains("paqet PTCP 127.0.0.1:8000"), "{name}: PTCP header missing");
    assert!(all.contains("paqet PUDP 127.0.0.1:5300"), "{name}: PUDP header missing");
    assert!(all.contains("smux Upd sid=9 len=8 consumed="), "{name}: UPD missing");
    // Every stream the client opened shows its SYN (7 SYNs, sids 3..=15).
    for sid in [3, 5, 7, 9, 11, 13, 15] {
        assert!(all.contains(&format!("smux Syn sid={sid} len=0")), "{name}: SYN of sid {sid} missing");
    }
    // The reply is 9 PSH frames on sid 9; with the in-order reassembly each is found where it starts.
    let reply_frames = all.matches("smux Psh sid=9 len=").count();
    assert_eq!(reply_frames, 2 + 9, "{name}: PSH frames of sid 9 (2 client + 9 server)");
    // Nothing was undecodable.
    assert!(!all.contains("smux: smux frame"), "{name}: smux decode error:\n{all}");
}

#[test]
fn fast_capture_decodes_every_layer() {
    check_capture("fast", "552f9463", None);
}

#[test]
fn fec_capture_decodes_every_layer() {
    check_capture("fec", "f2c0d581", Some((10, 3)));
    let all = describe_all("fec", Crypto::new(BlockMode::Aes, KEY).unwrap(), Some((10, 3))).concat();
    assert_eq!(all.matches(" parity ").count(), 18, "18 parity packets");
    assert!(all.contains("fec seqid=0 data (group 0, shard 0)"));
    assert!(all.contains("(retransmission: sn"), "the 3 retransmitted server segments are flagged");
}

#[test]
fn wrong_key_fails_every_crypto_check() {
    for name in ["fast", "fec"] {
        let wrong = Crypto::new(BlockMode::Aes, "not-the-key").unwrap();
        for b in describe_all(name, wrong, None) {
            assert!(b.contains("crypto check failed (CRC mismatch)"), "{name}:\n{b}");
            assert!(!b.contains("kcp conv="), "{name}: decoded with a wrong key:\n{b}");
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
