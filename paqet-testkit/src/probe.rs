//! The active prober's packets: IPv4/IPv6 TCP frame builders and parsers, the Internet checksum, the scan set
//! and the comparison of a port's answers with a closed port's, shared by `paqet-userspace/tests/probe_scan.rs`
//! (frames injected and captured with AF_PACKET in test namespaces) and `cargo xtask probe` (raw IP sockets
//! against a target).
use std::net::{Ipv4Addr, SocketAddr};

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

/// One scan: a name, the TCP flags, TCP options and a payload.
#[derive(Clone, Debug)]
pub struct Scan {
    pub name: &'static str,
    pub flags: u8,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

/// The scans a prober sends: SYN (with MSS/WS options), SYN with a payload, ACK, FIN, FIN|ACK, NULL, Xmas,
/// PSH|ACK and PSH with garbage, SYN|ACK, RST. The last one is never answered by Linux.
pub fn scans() -> Vec<Scan> {
    let s = |name, flags, options: &[u8], payload: &[u8]| Scan {
        name,
        flags,
        options: options.to_vec(),
        payload: payload.to_vec(),
    };
    let garbage: Vec<u8> = (0..120u32)
        .map(|i| (i.wrapping_mul(151) ^ 0x5a) as u8)
        .collect();
    vec![
        s("SYN", SYN, &[2, 4, 0x05, 0xb4, 1, 1, 4, 2], &[]),
        s("SYN with payload", SYN, &[], b"GET / HTTP/1.0\r\n\r\n"),
        s("ACK", ACK, &[], &[]),
        s("FIN", FIN, &[], &[]),
        s("FIN|ACK", FIN | ACK, &[], &[]),
        s("NULL", 0, &[], &[]),
        s("Xmas", FIN | PSH | URG, &[], &[]),
        s("PSH|ACK garbage", PSH | ACK, &[], &garbage),
        s("PSH garbage, no ACK", PSH, &[], &garbage[..64]),
        s("SYN|ACK", SYN | ACK, &[], &[]),
        s("RST", RST, &[], &[]),
    ]
}

/// Offsets of the bytes of an Ethernet/IPv4 answer that may differ between two ports' answers to the same
/// probe: the ports (34..38) and the TCP checksum (50..52). The other bytes of `ours` that differ from
/// `kernel`'s, or `Err` with both lengths.
pub fn differing_bytes4(ours: &[u8], kernel: &[u8]) -> Result<Vec<usize>, (usize, usize)> {
    if ours.len() != kernel.len() {
        return Err((ours.len(), kernel.len()));
    }
    Ok((0..ours.len())
        .filter(|i| !(34..38).contains(i) && !(50..52).contains(i) && ours[*i] != kernel[*i])
        .collect())
}

/// The Internet checksum of `data` on top of the partial sum `sum`.
pub fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP checksum of an IPv4 `frame` (Ethernet) as it should be.
pub fn tcp4_csum(frame: &[u8]) -> u16 {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let t = 14 + ihl;
    let tcp_len = total - ihl;
    let mut tcp = frame[t..t + tcp_len].to_vec();
    tcp[16..18].copy_from_slice(&[0, 0]);
    let mut sum = 6 + tcp_len as u32;
    for c in frame[26..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    csum(&tcp, sum)
}

/// The IPv4 header checksum of `frame` (Ethernet) as it should be.
pub fn ip4_csum(frame: &[u8]) -> u16 {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let mut h = frame[14..14 + ihl].to_vec();
    h[10..12].copy_from_slice(&[0, 0]);
    csum(&h, 0)
}

/// An IPv4/TCP frame's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp4 {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Offset of the TCP payload in the frame, and its length by the IP length.
    pub payload_at: usize,
    pub payload_len: usize,
}

/// Parses an Ethernet/IPv4/TCP frame.
pub fn parse4(frame: &[u8]) -> Option<Tcp4> {
    if frame.len() < 14 + 20 + 20 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let t = 14 + ihl;
    let tcp = frame.get(t..t + 20)?;
    let doff = usize::from(tcp[12] >> 4) * 4;
    let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let be32 = |o: usize| u32::from_be_bytes([tcp[o], tcp[o + 1], tcp[o + 2], tcp[o + 3]]);
    Some(Tcp4 {
        src: SocketAddr::from((ip(26), u16::from_be_bytes([tcp[0], tcp[1]]))),
        dst: SocketAddr::from((ip(30), u16::from_be_bytes([tcp[2], tcp[3]]))),
        seq: be32(4),
        ack: be32(8),
        flags: tcp[13],
        payload_at: t + doff,
        payload_len: total.saturating_sub(ihl + doff),
    })
}

/// What to put in a built frame.
#[derive(Clone, Debug)]
pub struct Probe {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub tos: u8,
    /// TCP options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

/// The Ethernet/IPv4/TCP frame of `p`, checksums right (IP ID 0x1234, DF, TTL 64, window 1024).
pub fn build4(p: &Probe) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (p.src, p.dst) else {
        panic!("IPv4 only")
    };
    let thl = 20 + p.options.len();
    let total = 20 + thl + p.payload.len();
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&p.dst_mac);
    f.extend_from_slice(&p.src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, p.tos]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&p.seq.to_be_bytes());
    f.extend_from_slice(&p.ack.to_be_bytes());
    f.extend_from_slice(&[((thl / 4) as u8) << 4, p.flags, 0x04, 0x00, 0, 0, 0, 0]);
    f.extend_from_slice(&p.options);
    f.extend_from_slice(&p.payload);
    let c = ip4_csum(&f);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let c = tcp4_csum(&f);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

/// `frame` (Ethernet/IPv4/TCP) with another source address and port, checksums recomputed; a frame
/// longer than its IP length is cut to it.
pub fn resourced(frame: &[u8], src: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(src) = src else {
        panic!("IPv4 only")
    };
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let mut f = frame[..14 + total].to_vec();
    let ihl = usize::from(f[14] & 0x0f) * 4;
    f[26..30].copy_from_slice(&src.ip().octets());
    f[14 + ihl..14 + ihl + 2].copy_from_slice(&src.port().to_be_bytes());
    let c = ip4_csum(&f);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let c = tcp4_csum(&f);
    f[14 + ihl + 16..14 + ihl + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// A MAC address "aa:bb:..." as bytes.
pub fn mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

/// The Ethernet/IPv6/TCP frame of `p` (traffic class `p.tos`, flow label 0, hop limit 64, window 1024),
/// checksum right.
pub fn build6(p: &Probe) -> Vec<u8> {
    let (SocketAddr::V6(src), SocketAddr::V6(dst)) = (p.src, p.dst) else {
        panic!("IPv6 only")
    };
    let thl = 20 + p.options.len();
    let plen = thl + p.payload.len();
    let mut f = Vec::with_capacity(14 + 40 + plen);
    f.extend_from_slice(&p.dst_mac);
    f.extend_from_slice(&p.src_mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60 | (p.tos >> 4), p.tos << 4, 0, 0]);
    f.extend_from_slice(&(plen as u16).to_be_bytes());
    f.extend_from_slice(&[6, 64]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&p.seq.to_be_bytes());
    f.extend_from_slice(&p.ack.to_be_bytes());
    f.extend_from_slice(&[((thl / 4) as u8) << 4, p.flags, 0x04, 0x00, 0, 0, 0, 0]);
    f.extend_from_slice(&p.options);
    f.extend_from_slice(&p.payload);
    let c = tcp6_csum(&f);
    f[70..72].copy_from_slice(&c.to_be_bytes());
    f
}

/// The TCP checksum of an IPv6 `frame` (Ethernet, no extension headers) as it should be.
pub fn tcp6_csum(frame: &[u8]) -> u16 {
    let plen = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let mut tcp = frame[54..54 + plen].to_vec();
    tcp[16..18].copy_from_slice(&[0, 0]);
    let mut sum = 6 + plen as u32;
    for c in frame[22..54].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    csum(&tcp, sum)
}

/// Source, destination and flags of an Ethernet/IPv6/TCP frame (no extension headers).
pub fn parse6(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
    if frame.len() < 14 + 40 + 20 || frame[12..14] != [0x86, 0xdd] || frame[20] != 6 {
        return None;
    }
    let ip = |o: usize| -> std::net::Ipv6Addr {
        let b: [u8; 16] = frame[o..o + 16].try_into().unwrap();
        b.into()
    };
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    Some((
        SocketAddr::from((ip(22), port(54))),
        SocketAddr::from((ip(38), port(56))),
        frame[67],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(src: &str, dst: &str) -> Probe {
        Probe {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq: 7,
            ack: 9,
            flags: SYN | ACK,
            tos: 0x2a,
            options: vec![1, 1, 1, 1],
            payload: b"abc".to_vec(),
        }
    }

    #[test]
    fn frames_round_trip_with_valid_checksums() {
        let f = build4(&probe("10.0.0.1:4000", "10.0.0.2:9999"));
        let p = parse4(&f).unwrap();
        assert_eq!((p.seq, p.ack, p.flags, p.payload_len), (7, 9, SYN | ACK, 3));
        assert_eq!(&f[p.payload_at..], b"abc");
        assert_eq!(ip4_csum(&f), u16::from_be_bytes([f[24], f[25]]));
        assert_eq!(tcp4_csum(&f), u16::from_be_bytes([f[50], f[51]]));
        let r = resourced(&f, "10.0.0.9:5000".parse().unwrap());
        assert_eq!(parse4(&r).unwrap().src, "10.0.0.9:5000".parse().unwrap());
        assert_eq!(tcp4_csum(&r), u16::from_be_bytes([r[50], r[51]]));
        let g = build6(&probe("[fd00::1]:4000", "[fd00::2]:9999"));
        let (s, d, flags) = parse6(&g).unwrap();
        assert_eq!((s.port(), d.port(), flags), (4000, 9999, SYN | ACK));
        assert_eq!(tcp6_csum(&g), u16::from_be_bytes([g[70], g[71]]));
    }

    #[test]
    fn answers_compare_but_ports_and_checksum() {
        let a = build4(&probe("10.0.0.2:9999", "10.0.0.1:4000"));
        let b = build4(&probe("10.0.0.2:9990", "10.0.0.1:4001"));
        assert_eq!(differing_bytes4(&a, &b), Ok(vec![]));
        let mut c = b.clone();
        c[22] ^= 1; // TTL
        assert_eq!(differing_bytes4(&a, &c), Ok(vec![22]));
        assert_eq!(differing_bytes4(&a, &b[..50]), Err((a.len(), 50)));
        assert_eq!(scans().last().unwrap().flags, RST);
    }
}
