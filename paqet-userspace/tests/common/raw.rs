//! Raw frames for the active-prober tests: an AF_PACKET sniffer and injector on a namespace's interface,
//! an IPv4/TCP frame builder and parser, and the Internet checksum.
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use paqet_testkit::netns::Netns;

/// `sll_pkttype` of a frame this host sent.
pub const PACKET_OUTGOING: u8 = 4;

/// Captured frames: (`sll_pkttype`, bytes).
type Frames = Arc<Mutex<Vec<(u8, Vec<u8>)>>>;

/// Every frame seen on one interface (both directions), with its `sll_pkttype`; stopped on drop.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    frames: Frames,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Sniffer {
    /// Starts capturing on `dev` in `ns`; returns once the socket is bound.
    pub fn start(ns: &Netns, dev: &str) -> Sniffer {
        let stop = Arc::new(AtomicBool::new(false));
        let frames: Frames = Arc::default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s, f) = (stop.clone(), frames.clone());
        let dev = std::ffi::CString::new(dev).unwrap();
        let thread = ns.spawn(move || {
            // SAFETY: plain socket calls on a descriptor we own and close; the address structs are zeroed
            // and sized for their type; the receive buffer outlives each call.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
                assert!(sll.sll_ifindex > 0, "if_nametoindex");
                let r = libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let _ = ready_tx.send(());
                let mut buf = vec![0u8; 65536];
                while !s.load(Ordering::Relaxed) {
                    let mut from: libc::sockaddr_ll = std::mem::zeroed();
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    let n = libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    );
                    if n > 0 {
                        f.lock()
                            .unwrap()
                            .push((from.sll_pkttype, buf[..n as usize].to_vec()));
                    }
                }
                libc::close(fd);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("sniffer bound");
        Sniffer {
            stop,
            frames,
            thread: Some(thread),
        }
    }

    /// The frames captured so far (pkttype, bytes).
    pub fn frames(&self) -> Vec<(u8, Vec<u8>)> {
        self.frames.lock().unwrap().clone()
    }

    /// Forgets the frames captured so far.
    pub fn clear(&self) {
        self.frames.lock().unwrap().clear();
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends raw Ethernet frames out of `dev` in `ns` (an AF_PACKET socket), `gap` apart.
pub fn inject(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>, gap: Duration) {
    let dev = std::ffi::CString::new(dev).unwrap();
    ns.spawn(move || {
        // SAFETY: plain socket calls on a descriptor we own and close; the address struct is zeroed and
        // sized for sockaddr_ll.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
            sll.sll_halen = 6;
            for f in &frames {
                sll.sll_addr[..6].copy_from_slice(&f[..6]);
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
                std::thread::sleep(gap);
            }
            libc::close(fd);
        }
    })
    .join()
    .expect("injector thread")
    .expect("netns");
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
