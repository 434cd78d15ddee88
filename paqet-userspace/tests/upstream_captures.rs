//! Real upstream bytes: every capture in `../shared/testdata/upstream-alpha21/` (traffic between two
//! upstream paqet v1.0.0-alpha.21 peers) is decoded end to end with the key from its config, layer by layer:
//! envelope → crypto framing → FEC → KCP → smux v2 → paqet header → payload. Then the client's side is
//! re-emitted with our encoder and its envelope fields and layouts are compared with upstream's.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use paqet::proto::fec::FecDecoder;
use paqet::proto::kcp::{Kcp, KcpConfig, KcpMode};
use paqet::proto::smux::{Role as SmuxRole, Smux, SmuxConfig, SmuxEvent};
use paqet::util::pcapfile::PcapFile;
use paqet::wire::crypt::{BlockMode, Crypto};
use paqet::wire::envelope::{
    internet_checksum, parse_frame, transport_checksum, EnvelopeBuilder, TcpFlags,
};
use paqet::wire::header::Header;
use paqet::wire::kcp::{Cmd as KcpCmd, Segments};
use paqet::wire::smux::{Cmd as SmuxCmd, FrameHeader, HEADER_LEN};
use sha2::{Digest, Sha256};

const KEY: &str = "0edb843fa5d512bbb688b437e6035b4965731b527bf229f2eed94185f23a3740";
const SERVER_PORT: u16 = 9999;
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const BODY_SHA256: &str = "4b640d85ab3ba30fd02c9fc9db4a8928f416322ad27022ea58a65aaee68a4df2";
const UDP_PROBE: &[u8] = b"paqet-udp-probe-0001";
const HTTP_REQUEST: &[u8] =
    b"GET /small.bin HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";

struct Profile {
    name: &'static str,
    block: BlockMode,
    fec: bool,
    client_port: u16,
    conv: u32,
    /// KCP PUSH segments (unique sn) client→server, server→client.
    pushes: (usize, usize),
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "fast",
        block: BlockMode::Aes,
        fec: false,
        client_port: 35748,
        conv: 0x552f9463,
        pushes: (5, 54),
    },
    Profile {
        name: "gcm",
        block: BlockMode::Aes128Gcm,
        fec: false,
        client_port: 48674,
        conv: 0x9eff786a,
        pushes: (5, 53),
    },
    Profile {
        name: "salsa",
        block: BlockMode::Salsa20,
        fec: false,
        client_port: 54367,
        conv: 0xb55078da,
        pushes: (5, 53),
    },
    Profile {
        name: "fec",
        block: BlockMode::Aes,
        fec: true,
        client_port: 61905,
        conv: 0xf2c0d581,
        pushes: (6, 53),
    },
    Profile {
        name: "none",
        block: BlockMode::None,
        fec: false,
        client_port: 60767,
        conv: 0x76b1275a,
        pushes: (5, 53),
    },
    Profile {
        name: "null",
        block: BlockMode::Null,
        fec: false,
        client_port: 38968,
        conv: 0x60da1330,
        pushes: (5, 52),
    },
];

fn testdata(name: &str) -> Vec<u8> {
    let dir = std::env::var("PAQET_TESTDATA").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/testdata/upstream-alpha21"
        )
        .to_string()
    });
    std::fs::read(format!("{dir}/{name}")).unwrap_or_else(|e| panic!("{dir}/{name}: {e}"))
}

/// One captured datagram after the envelope and crypto layers.
struct Datagram {
    frame: Vec<u8>,
    c2s: bool,
    ts_ms: u32,
    body: Vec<u8>,
}

/// Step 1 + 2: envelope checks on every frame, then crypto open.
fn envelope_and_crypto(p: &Profile, crypto: &Crypto) -> Vec<Datagram> {
    let file = testdata(&format!("{}.pcap", p.name));
    let pcap = PcapFile::parse(&file).expect("pcap");
    assert_eq!(pcap.link_type, 1);
    let t0 = pcap.records[0].ts_micros;
    let mut out = Vec::new();
    for (i, r) in pcap.records.iter().enumerate() {
        let f = r.data;
        let e = parse_frame(f, None).unwrap_or_else(|e| panic!("{} frame {i}: {e}", p.name));
        let c2s = e.dst_port == SERVER_PORT;
        let (client_ip, server_ip) = (
            IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)),
        );
        if c2s {
            assert_eq!(
                (e.src_ip, e.dst_ip, e.src_port),
                (client_ip, server_ip, p.client_port),
                "{} frame {i}",
                p.name
            );
            assert_eq!((e.src_mac, e.dst_mac), (CLIENT_MAC, SERVER_MAC));
        } else {
            assert_eq!(
                (e.src_ip, e.dst_ip, e.src_port, e.dst_port),
                (server_ip, client_ip, SERVER_PORT, p.client_port)
            );
            assert_eq!((e.src_mac, e.dst_mac), (SERVER_MAC, CLIENT_MAC));
        }
        assert_eq!(e.flags, TcpFlags::PSH_ACK, "{} frame {i}: flags", p.name);
        // Ethernet II, IPv4 fields as upstream emits them.
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x45, "IHL 5");
        assert_eq!(f[15], 184, "TOS");
        assert_eq!(&f[18..20], &[0, 0], "IP ID");
        assert_eq!(&f[20..22], &[0x40, 0], "DF, no fragment offset");
        assert_eq!(f[22], 64, "TTL");
        assert_eq!(f[23], 6, "protocol");
        assert_eq!(
            internet_checksum(&f[14..34]),
            0,
            "{} frame {i}: IPv4 checksum",
            p.name
        );
        // TCP: data offset 8 with the timestamp option, window 65535, valid checksum.
        assert_eq!(f[46] >> 4, 8, "data offset");
        assert_eq!(&f[48..50], &[0xff, 0xff], "window");
        assert_eq!(&f[54..58], &[1, 1, 8, 10], "NOP NOP TS");
        assert_eq!(
            transport_checksum(e.src_ip, e.dst_ip, 6, &f[34..]),
            0,
            "{} frame {i}: TCP checksum",
            p.name
        );
        assert!(!e.payload.is_empty());
        // Crypto: every datagram authenticates.
        let mut pkt = e.payload.to_vec();
        let body = crypto
            .open(&mut pkt)
            .unwrap_or_else(|err| panic!("{} frame {i}: {err}", p.name));
        out.push(Datagram {
            frame: f.to_vec(),
            c2s,
            ts_ms: ((r.ts_micros - t0) / 1000) as u32,
            body: pkt[body].to_vec(),
        });
    }
    out
}

/// Step 3: FEC layer → the KCP bytes of every datagram, per direction, in capture order.
fn fec_layer(p: &Profile, dgrams: &[Datagram], c2s: bool) -> Vec<Vec<u8>> {
    let mut kcp = Vec::new();
    if !p.fec {
        for d in dgrams.iter().filter(|d| d.c2s == c2s) {
            kcp.push(d.body.clone());
        }
        return kcp;
    }
    let mut dec = FecDecoder::new(10, 3).unwrap();
    for d in dgrams.iter().filter(|d| d.c2s == c2s) {
        dec.decode(&d.body, d.ts_ms, &mut |k| kcp.push(k.to_vec()))
            .expect("fec decode");
    }
    kcp
}

/// Step 4: KCP reassembly, twice: by the wire codec (PUSH data by sn, contiguous from 0, once per sn) and
/// by our KCP state machine fed the datagrams; both must agree.
fn kcp_layer(p: &Profile, kcp_dgrams: &[Vec<u8>], ts: &[u32]) -> (Vec<u8>, usize) {
    let mut by_sn: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for d in kcp_dgrams {
        for seg in Segments::new(d) {
            let (h, data) = seg.expect("kcp segment");
            assert_eq!(h.conv, p.conv, "{}: conv", p.name);
            assert_eq!(h.frg, 0, "stream mode");
            if h.cmd == KcpCmd::Push {
                if let Some(prev) = by_sn.insert(h.sn, data.to_vec()) {
                    assert_eq!(prev, data, "{}: retransmitted sn {} differs", p.name, h.sn);
                }
            }
        }
    }
    let sns: Vec<u32> = by_sn.keys().copied().collect();
    assert_eq!(
        sns,
        (0..sns.len() as u32).collect::<Vec<_>>(),
        "{}: sn contiguous from 0",
        p.name
    );
    let stream: Vec<u8> = by_sn.values().flatten().copied().collect();

    let mut cfg = KcpConfig::preset(KcpMode::Fast);
    cfg.rcvwnd = 1024;
    let mut kcp = Kcp::new(p.conv, &cfg, 0);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 17];
    for (d, &t) in kcp_dgrams.iter().zip(ts) {
        kcp.input(t, d).expect("kcp input");
        loop {
            let n = kcp.recv(&mut buf);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(got, stream, "{}: KCP state machine reassembly", p.name);
    (stream, by_sn.len())
}

/// Step 5: smux v2 frames of one direction: (sid → [(cmd, data)]).
fn smux_frames(stream: &[u8]) -> BTreeMap<u32, Vec<(SmuxCmd, Vec<u8>)>> {
    let mut out: BTreeMap<u32, Vec<(SmuxCmd, Vec<u8>)>> = BTreeMap::new();
    let mut off = 0;
    while off < stream.len() {
        let h = FrameHeader::parse(&stream[off..], 2).expect("smux frame");
        let data = stream[off + HEADER_LEN..off + HEADER_LEN + h.length as usize].to_vec();
        out.entry(h.sid).or_default().push((h.cmd, data));
        off += HEADER_LEN + h.length as usize;
    }
    assert_eq!(
        off,
        stream.len(),
        "smux frames end exactly at the end of the stream"
    );
    out
}

fn cmds(frames: &[(SmuxCmd, Vec<u8>)]) -> Vec<(SmuxCmd, usize)> {
    frames.iter().map(|(c, d)| (*c, d.len())).collect()
}

fn decode_profile(p: &Profile) {
    let crypto = Crypto::new(p.block, KEY).expect("crypto");
    let dgrams = envelope_and_crypto(p, &crypto);
    let n_c2s = dgrams.iter().filter(|d| d.c2s).count();
    let n_s2c = dgrams.len() - n_c2s;
    assert!(
        n_c2s >= 7 && n_s2c >= 56,
        "{}: {n_c2s}/{n_s2c} datagrams",
        p.name
    );

    let ts = |c2s: bool| -> Vec<u32> {
        // With FEC, a recovered packet would shift timestamps; none is recovered in these files.
        dgrams
            .iter()
            .filter(|d| d.c2s == c2s && (!p.fec || d.body[4] == 0xf1))
            .map(|d| d.ts_ms)
            .collect()
    };
    let (c2s_kcp, s2c_kcp) = (fec_layer(p, &dgrams, true), fec_layer(p, &dgrams, false));
    let (c2s, c2s_push) = kcp_layer(p, &c2s_kcp, &ts(true));
    let (s2c, s2c_push) = kcp_layer(p, &s2c_kcp, &ts(false));
    assert_eq!(
        (c2s_push, s2c_push),
        p.pushes,
        "{}: PUSH segments per direction",
        p.name
    );
    assert_eq!(c2s.len(), 357, "{}: client→server smux bytes", p.name);
    assert_eq!(s2c.len(), 65967, "{}: server→client smux bytes", p.name);

    // smux frames per stream, as the captures README lists them.
    use SmuxCmd::*;
    let up = smux_frames(&c2s);
    let down = smux_frames(&s2c);
    assert_eq!(
        up.keys().copied().collect::<Vec<_>>(),
        vec![3, 5, 7, 9, 11, 13, 15]
    );
    for sid in [3, 7, 13] {
        assert_eq!(
            cmds(&up[&sid]),
            vec![(Syn, 0), (Psh, 8), (Fin, 0)],
            "{} sid {sid}",
            p.name
        );
        let mut d = cmds(&down[&sid]);
        d.sort_by_key(|c| c.0 as u8);
        assert_eq!(d, vec![(Fin, 0), (Upd, 8)], "{} sid {sid} down", p.name);
    }
    for sid in [5, 11] {
        assert_eq!(cmds(&up[&sid]), vec![(Syn, 0), (Fin, 0)]);
        assert_eq!(cmds(&down[&sid]), vec![(Fin, 0)]);
    }
    assert_eq!(
        cmds(&up[&9]),
        vec![(Syn, 0), (Psh, 17), (Psh, 87), (Upd, 8), (Fin, 0)],
        "{} sid 9",
        p.name
    );
    assert_eq!(
        cmds(&up[&15]),
        vec![(Syn, 0), (Psh, 17), (Psh, 20), (Upd, 8)],
        "{} sid 15",
        p.name
    );
    let d9 = &down[&9];
    assert_eq!(d9.iter().filter(|f| f.0 == Psh).count(), 9);
    assert_eq!(d9.iter().filter(|f| f.0 == Upd).count(), 1);
    assert_eq!(d9.last().unwrap().0, Fin);
    let mut d15 = cmds(&down[&15]);
    d15.sort_by_key(|c| c.0 as u8);
    assert_eq!(d15, vec![(Psh, 20), (Upd, 8)]);

    // Step 6: paqet headers.
    let pa = Header::TcpFlags(vec![TcpFlags::from_letters("PA").unwrap().0]);
    for sid in [3, 7, 13] {
        let (h, used) = Header::parse(&up[&sid][1].1).unwrap().unwrap();
        assert_eq!((h, used), (pa.clone(), 8));
    }
    let tcp = Header::parse(&up[&9][1].1).unwrap().unwrap();
    assert_eq!(
        tcp,
        (
            Header::Tcp {
                host: "127.0.0.1".into(),
                port: 8000
            },
            17
        )
    );
    let udp = Header::parse(&up[&15][1].1).unwrap().unwrap();
    assert_eq!(
        udp,
        (
            Header::Udp {
                host: "127.0.0.1".into(),
                port: 5300
            },
            17
        )
    );

    // Step 7: payloads. The HTTP request and the UDP datagram one way, the reply and the echo the other.
    assert_eq!(up[&9][2].1, HTTP_REQUEST);
    assert_eq!(up[&15][2].1, UDP_PROBE);
    let reply: Vec<u8> = d9
        .iter()
        .filter(|f| f.0 == Psh)
        .flat_map(|f| f.1.clone())
        .collect();
    assert_eq!(reply.len(), 65739);
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of HTTP headers")
        + 4;
    assert_eq!(split, 203, "HTTP header bytes");
    assert!(reply.starts_with(b"HTTP/1.0 200 OK\r\n"));
    let body = &reply[split..];
    assert_eq!(hex::encode(Sha256::digest(body)), BODY_SHA256);
    assert!(body.iter().enumerate().all(|(i, &b)| b as usize == i % 251));
    assert_eq!(down[&15].iter().find(|f| f.0 == Psh).unwrap().1, UDP_PROBE);

    // Our smux state machine reads the client's byte stream the same way (server role).
    let mut smux = Smux::new(SmuxRole::Server, SmuxConfig::default(), 0);
    assert_eq!(smux.input(0, &c2s).expect("smux input"), c2s.len());
    let mut opened = Vec::new();
    while let Some(ev) = smux.poll_event() {
        if let SmuxEvent::Opened(sid) = ev {
            opened.push(sid);
        }
    }
    opened.sort();
    assert_eq!(opened, vec![3, 5, 7, 9, 11, 13, 15]);
    let mut s9 = vec![0u8; 256];
    let n = smux.read(9, &mut s9).unwrap();
    assert_eq!(&s9[..n], [&up[&9][1].1[..], HTTP_REQUEST].concat());
    assert_eq!(smux.read_frame(15).unwrap().unwrap().len(), 17);
    assert_eq!(smux.read_frame(15).unwrap().unwrap(), UDP_PROBE);

    reemit_client_side(p, &dgrams, &crypto);
}

/// Re-emit every client→server datagram with our encoder (envelope + crypto [+ FEC]) and compare with
/// upstream's frame: same length, same Ethernet and IPv4 header (checksum included), same TCP layout
/// (ports, data offset, flags, window, option kinds); only seq/ack/timestamps, the TCP checksum and the
/// nonce may differ. With FEC the whole decrypted body (seqid, type, size, KCP bytes) must be identical.
fn reemit_client_side(p: &Profile, dgrams: &[Datagram], crypto: &Crypto) {
    let mut crypto = crypto.clone();
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)), p.client_port);
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)), SERVER_PORT);
    let mut env = EnvelopeBuilder::new(CLIENT_MAC, SERVER_MAC, src, dst, 0x1234_5678).unwrap();
    let hr = crypto.header_len();
    let mut fec = p
        .fec
        .then(|| paqet::proto::fec::FecEncoder::new(10, 3, hr).unwrap());
    for (i, d) in dgrams.iter().filter(|d| d.c2s).enumerate() {
        let mut buf = vec![0u8; 2048];
        let body_len = match fec.as_mut() {
            Some(enc) => {
                let kcp = paqet::wire::fec::parse(&d.body).unwrap().payload.to_vec();
                buf[hr + 8..hr + 8 + kcp.len()].copy_from_slice(&kcp);
                let used = enc.encode(&mut buf, kcp.len(), d.ts_ms, 1000, &mut |_| {
                    panic!("no parity upstream")
                });
                assert_eq!(
                    &buf[hr..used],
                    &d.body[..],
                    "{} datagram {i}: FEC framing",
                    p.name
                );
                used - hr
            }
            None => {
                buf[hr..hr + d.body.len()].copy_from_slice(&d.body);
                d.body.len()
            }
        };
        let sealed = crypto.seal(&mut buf, body_len).unwrap();
        let mut frame = vec![0u8; 66 + sealed];
        frame[66..].copy_from_slice(&buf[..sealed]);
        let n = env.emit(TcpFlags::PSH_ACK, sealed, &mut frame).unwrap();
        assert_eq!(n, d.frame.len(), "{} datagram {i}: frame length", p.name);
        let up = &d.frame;
        assert_eq!(
            frame[..34],
            up[..34],
            "{} datagram {i}: Ethernet + IPv4 header",
            p.name
        );
        assert_eq!(frame[34..38], up[34..38], "ports");
        assert_eq!(frame[46..50], up[46..50], "data offset, flags, window");
        assert_eq!(frame[52..58], up[52..58], "urgent pointer, option kinds");
        let ours = parse_frame(&frame, Some(SERVER_PORT)).unwrap();
        assert_eq!(
            transport_checksum(ours.src_ip, ours.dst_ip, 6, &frame[34..]),
            0
        );
        // And our frame decodes back to the same body.
        let mut pl = ours.payload.to_vec();
        let r = crypto.open(&mut pl).unwrap();
        assert_eq!(
            pl[r],
            d.body[..],
            "{} datagram {i}: body round trip",
            p.name
        );
    }
}

#[test]
fn fast_aes() {
    decode_profile(&PROFILES[0]);
}
#[test]
fn gcm_aes_128_gcm() {
    decode_profile(&PROFILES[1]);
}
#[test]
fn salsa20() {
    decode_profile(&PROFILES[2]);
}
#[test]
fn fec_aes_10_3() {
    decode_profile(&PROFILES[3]);
}
#[test]
fn none() {
    decode_profile(&PROFILES[4]);
}
#[test]
fn null() {
    decode_profile(&PROFILES[5]);
}

/// FEC: dropping any one data packet of every complete server→client group still reassembles the same
/// KCP byte stream (recovered from parity), and the recovered count says so.
#[test]
fn fec_recovers_a_dropped_data_packet() {
    let p = &PROFILES[3];
    let crypto = Crypto::new(p.block, KEY).unwrap();
    let dgrams = envelope_and_crypto(p, &crypto);
    let s2c: Vec<&Datagram> = dgrams.iter().filter(|d| !d.c2s).collect();
    let full = {
        let mut dec = FecDecoder::new(10, 3).unwrap();
        let mut v = Vec::new();
        for d in &s2c {
            dec.decode(&d.body, d.ts_ms, &mut |k| v.push(k.to_vec()))
                .unwrap();
        }
        v
    };
    // Groups with parity: seqid / 13 where some member is a parity packet.
    let seqid = |d: &Datagram| u32::from_le_bytes(d.body[..4].try_into().unwrap());
    let groups: std::collections::BTreeSet<u32> = s2c
        .iter()
        .filter(|d| d.body[4] == 0xf2)
        .map(|d| seqid(d) / 13)
        .collect();
    assert!(groups.len() >= 5, "capture has complete groups");
    for g in groups {
        for drop_idx in 0..10u32 {
            let victim = g * 13 + drop_idx;
            let mut dec = FecDecoder::new(10, 3).unwrap();
            let mut v = Vec::new();
            for d in s2c.iter().filter(|d| seqid(d) != victim) {
                dec.decode(&d.body, d.ts_ms, &mut |k| v.push(k.to_vec()))
                    .unwrap();
            }
            assert_eq!(
                dec.stats().recovered,
                1,
                "group {g}, dropped shard {drop_idx}"
            );
            let mut a = full.clone();
            let mut b = v;
            a.sort();
            b.sort();
            assert_eq!(
                a, b,
                "group {g}, dropped shard {drop_idx}: same KCP datagrams"
            );
        }
    }
}
