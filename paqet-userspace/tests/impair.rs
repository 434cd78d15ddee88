//! Root-only: the impaired A—M—B link delays, drops and still carries TCP byte-exact
//! (`paqet_testkit::impair`). Skips with a message when not root.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;

use paqet_testkit::impair::{ImpairedLink, LinkSpec};
use paqet_testkit::netns::is_root;

fn link(tag: &str, spec: LinkSpec) -> Option<ImpairedLink> {
    if !is_root() {
        eprintln!("skipping: needs root (network namespaces, iptables, NFQUEUE)");
        return None;
    }
    if !Path::new("/proc/net/netfilter/nfnetlink_queue").exists() {
        eprintln!("skipping: kernel has no nfnetlink_queue");
        return None;
    }
    // The relay runs on a thread of this test inside the middle namespace.
    Some(ImpairedLink::new(tag, spec).expect("impaired link"))
}

/// Result of a ping run.
#[derive(Debug, Default)]
struct PingStats {
    /// Distinct echo replies received.
    received: u32,
    /// Replies received more than once.
    duplicates: u32,
    /// Smallest round trip in milliseconds.
    min_rtt_ms: f64,
    /// Replies that arrived after a reply to a later request (reordering).
    reordered: u32,
}

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests from namespace A to B, one every `interval_ms`, and collects the
/// replies until 1 s after the last request (a raw ICMP socket of our own: no `ping` binary needed).
fn ping(l: &ImpairedLink, count: u16, interval_ms: u64) -> PingStats {
    use std::time::{Duration, Instant};
    let dst = l.b_ip;
    l.a.spawn(move || {
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(
            fd >= 0,
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let ident: u16 = (std::process::id() & 0xffff) as u16;
        let mut sent_at = vec![None::<Instant>; count as usize];
        let mut seen = vec![0u32; count as usize];
        let mut stats = PingStats {
            min_rtt_ms: f64::INFINITY,
            ..Default::default()
        };
        let start = Instant::now();
        let mut next = 0u16;
        let end_of_sending = start + Duration::from_millis(interval_ms * u64::from(count));
        let mut buf = [0u8; 1500];
        let mut max_seq: Option<usize> = None;
        loop {
            let now = Instant::now();
            if next < count && now >= start + Duration::from_millis(interval_ms * u64::from(next)) {
                let mut pkt = [0u8; 64];
                pkt[0] = 8; // echo request
                pkt[4..6].copy_from_slice(&ident.to_be_bytes());
                pkt[6..8].copy_from_slice(&next.to_be_bytes());
                let c = icmp_checksum(&pkt);
                pkt[2..4].copy_from_slice(&c.to_be_bytes());
                sent_at[next as usize] = Some(Instant::now());
                // SAFETY: valid fd, buffer and address.
                let r = unsafe {
                    libc::sendto(
                        fd,
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        &sa as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                assert!(r == 64, "sendto: {}", std::io::Error::last_os_error());
                next += 1;
                continue;
            }
            if next >= count && now >= end_of_sending + Duration::from_secs(1) {
                break;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 2) } <= 0 {
                continue;
            }
            // SAFETY: valid fd and buffer.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 28 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let icmp = &buf[ihl..n as usize];
            if icmp.len() < 8 || icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != ident {
                continue;
            }
            let seq = usize::from(u16::from_be_bytes([icmp[6], icmp[7]]));
            let (Some(t), Some(s)) = (sent_at.get(seq).copied().flatten(), seen.get_mut(seq))
            else {
                continue;
            };
            *s += 1;
            if *s == 1 {
                if max_seq.is_some_and(|m| seq < m) {
                    stats.reordered += 1;
                }
                max_seq = max_seq.max(Some(seq));
                stats.received += 1;
                stats.min_rtt_ms = stats.min_rtt_ms.min(t.elapsed().as_secs_f64() * 1000.0);
            } else {
                stats.duplicates += 1;
            }
        }
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        stats
    })
    .join()
    .expect("ping thread")
    .expect("enter namespace A")
}

#[test]
fn delay_and_loss_are_applied_and_tcp_survives() {
    let spec = LinkSpec {
        delay_ms: 20,
        jitter_ms: 8,
        loss_pct: 2.0,
        dup_pct: 0.0,
        seed: 42,
    };
    let Some(l) = link("i", spec) else { return };
    let p = ping(&l, 200, 10);
    let (received, min_rtt) = (p.received, p.min_rtt_ms);
    eprintln!("ping: {p:?}");
    // 2 % per direction: about 4 % of the round trips are lost. Bounded so a lossless link fails and so
    // does a broken one (probability of 0 losses is 0.96^200 ≈ 3e-4).
    assert!(received < 200, "no loss at all over 200 pings");
    assert!(received >= 170, "far too much loss: {received}/200");
    // Each direction is held 20 ± 8 ms.
    assert!(
        min_rtt >= 24.0,
        "min RTT {min_rtt} ms, want ≥ 2 × (20 - 8) ms"
    );
    // Requests 10 ms apart, each round trip 40 ± 16 ms: the jitter reorders some replies.
    assert!(p.reordered > 0, "no reordering with 8 ms jitter: {p:?}");
    tcp_transfer(&l, 4 << 20);
}

#[test]
fn pure_delay_gives_at_least_twice_the_delay() {
    let spec = LinkSpec {
        delay_ms: 20,
        jitter_ms: 0,
        loss_pct: 0.0,
        dup_pct: 0.0,
        seed: 1,
    };
    let Some(l) = link("d", spec) else { return };
    let p = ping(&l, 20, 50);
    let (received, min_rtt) = (p.received, p.min_rtt_ms);
    assert_eq!(received, 20, "no loss configured");
    assert!(min_rtt >= 40.0, "min RTT {min_rtt} ms, want ≥ 40 ms");
}

#[test]
fn duplication_delivers_copies() {
    let spec = LinkSpec {
        delay_ms: 1,
        jitter_ms: 0,
        loss_pct: 0.0,
        dup_pct: 50.0,
        seed: 3,
    };
    let Some(l) = link("u", spec) else { return };
    let p = ping(&l, 100, 10);
    eprintln!("ping: {p:?}");
    // Each direction copies half the packets: about 1.25 copies per round trip on average.
    assert_eq!(p.received, 100, "no loss configured");
    assert!(p.duplicates >= 20, "too few duplicate replies: {p:?}");
    tcp_transfer(&l, 1 << 20);
}

/// B listens, A sends `len` pseudo-random bytes, B echoes their count and a checksum.
fn tcp_transfer(l: &ImpairedLink, len: usize) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = data.clone();
    let b_addr = SocketAddr::new(l.b_ip.into(), 5001);
    let server = l.b.spawn(move || {
        let lis = TcpListener::bind(b_addr).expect("bind in B");
        let (mut s, _) = lis.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        got
    });
    // Give the listener a moment to bind by retrying the connect (no timing assertion involved).
    let client = l.a.spawn(move || {
        let mut tries = 0;
        let mut s = loop {
            match TcpStream::connect(b_addr) {
                Ok(s) => break s,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("connect from A to {b_addr}: {e}"),
            }
        };
        s.write_all(&data).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    client.join().unwrap().expect("client netns");
    let got = server.join().unwrap().expect("server netns");
    assert_eq!(got.len(), want.len(), "transfer length");
    assert!(got == want, "transfer corrupted");
}
