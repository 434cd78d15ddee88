//! Small-packet flood for the per-core packet-rate bench: Ethernet + IPv4 + TCP (PSH|ACK) frames with a
//! 64-byte random payload, aimed at the tunnel port, sent with `sendmmsg` on an AF_PACKET socket bound to
//! one interface. Used only inside the bench's own namespaces.
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Payload bytes per frame.
pub const PAYLOAD: usize = 64;
const FRAME: usize = 14 + 20 + 20 + PAYLOAD;
const VARIANTS: usize = 256;
const BATCH: usize = 64;

/// Addresses of the flood frames.
pub struct Target {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One frame from `t`, with source port `sport` and payload `payload`.
fn frame(t: &Target, sport: u16, seq: u32, payload: &[u8; PAYLOAD]) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[0..6].copy_from_slice(&t.dst_mac);
    f[6..12].copy_from_slice(&t.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 20 + PAYLOAD) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&t.src.octets());
    ip[16..20].copy_from_slice(&t.dst.octets());
    let c = csum_fold(csum_add(0, ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp_len = 20 + PAYLOAD;
    {
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&t.dst_port.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18; // PSH|ACK
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    }
    f[54..].copy_from_slice(payload);
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&t.src.octets());
    pseudo[4..8].copy_from_slice(&t.dst.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let c = csum_fold(csum_add(csum_add(0, &pseudo), &f[34..]));
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

/// Sends frames on `iface` (of the calling thread's namespace) for `dur`; returns frames sent.
pub fn run(iface: &str, t: &Target, dur: Duration) -> Result<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let frames: Vec<[u8; FRAME]> = (0..VARIANTS)
        .map(|i| {
            let mut p = [0u8; PAYLOAD];
            for b in p.iter_mut() {
                *b = rnd() as u8;
            }
            frame(t, 40000 + (i % 64) as u16, rnd() as u32, &p)
        })
        .collect();
    let name = std::ffi::CString::new(iface).context("interface name")?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("interface {iface}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
    }
    let result = (|| -> Result<u64> {
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_protocol = 0;
        // SAFETY: sll is a valid sockaddr_ll.
        if unsafe {
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        } < 0
        {
            bail!(
                "bind AF_PACKET to {iface}: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(BATCH);
        let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
        let mut sent = 0u64;
        let mut next = 0usize;
        let end = Instant::now() + dur;
        while Instant::now() < end {
            iov.clear();
            hdrs.clear();
            for k in 0..BATCH {
                let f = &frames[(next + k) % VARIANTS];
                iov.push(libc::iovec {
                    iov_base: f.as_ptr() as *mut _,
                    iov_len: FRAME,
                });
            }
            for v in iov.iter_mut() {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = v as *mut libc::iovec;
                h.msg_hdr.msg_iovlen = 1;
                hdrs.push(h);
            }
            next = (next + BATCH) % VARIANTS;
            // SAFETY: hdrs/iov point at live frames for the duration of the call.
            let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), BATCH as u32, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS)
                    || e.kind() == std::io::ErrorKind::WouldBlock
                {
                    continue;
                }
                bail!("sendmmsg on {iface}: {e}");
            }
            sent += n as u64;
        }
        Ok(sent)
    })();
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_checksums_verify() {
        let t = Target {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            dst_port: 9999,
        };
        let f = frame(&t, 40001, 7, &[0xab; PAYLOAD]);
        // A correct one's-complement checksum sums (with itself) to 0xffff, i.e. folds to 0.
        assert_eq!(
            csum_fold(csum_add(0, &f[14..34])),
            0,
            "IPv4 header checksum"
        );
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&t.src.octets());
        pseudo[4..8].copy_from_slice(&t.dst.octets());
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&((20 + PAYLOAD) as u16).to_be_bytes());
        assert_eq!(
            csum_fold(csum_add(csum_add(0, &pseudo), &f[34..])),
            0,
            "TCP checksum"
        );
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 9999);
        assert_eq!(f.len(), 14 + 40 + 64);
    }
}
