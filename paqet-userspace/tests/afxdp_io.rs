//! XDP steering + AF_XDP I/O, end to end over a veth pair between two network namespaces this
//! test creates (root only; skipped with a message otherwise, or when the build has no XDP
//! program — set `PAQET_REQUIRE_XDP=1` to turn that skip into a failure, e.g. in CI).
//!
//! Namespace A runs the XDP program + AF_XDP socket(s); namespace B is the peer. Frames are crafted
//! in B and injected with an AF_PACKET socket; frames sent by A through AF_XDP are captured in B
//! with the pcap backend. All addresses live inside the two namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use paqet::io::afxdp::{AfXdpConfig, AfXdpIo};
use paqet::io::pcap::{PcapConfig, PcapIo, RawTx};
use paqet::io::steer::{has_xdp_program, Steering, XdpAttach, XdpMode, COUNTERS};
use paqet::io::{route, PacketIo};
use paqet_common::{SteerConfig, XdpCounter};
use paqet_testkit::netns::{is_root, Netns, VethPair};

const TUNNEL_PORT: u16 = 7443;
const OTHER_PORT: u16 = 7444;
const PEER_PORT: u16 = 40000;
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const IP6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xdb8, 0x231, 0, 0, 0, 0, 1);
const IP6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xdb8, 0x231, 0, 0, 0, 0, 2);
/// Bounded waits: this many polls of POLL each.
const POLLS: usize = 100;
const POLL: Duration = Duration::from_millis(50);

/// Captures the `log` records of this test process: what [`Steering::flush_logs`] forwards from the XDP
/// program (aya-log).
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let line = format!("{} {}", r.level(), r.args());
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

/// Installs [`CAPTURE`] as the process's `log` logger (before a program is loaded: its log reader binds
/// the logger installed at that moment).
fn capture_logs() {
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// The records captured since the last call.
fn captured() -> Vec<String> {
    std::mem::take(&mut *CAPTURE.0.lock().unwrap_or_else(|p| p.into_inner()))
}

fn skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("skipping {test}: needs root (network namespaces, XDP, AF_XDP)");
        return true;
    }
    if !has_xdp_program() {
        if std::env::var("PAQET_REQUIRE_XDP").as_deref() == Ok("1") {
            panic!("{test}: PAQET_REQUIRE_XDP=1 but this build has no XDP program (bpf-linker missing?)");
        }
        eprintln!(
            "skipping {test}: this build has no XDP program (install bpf-linker and rebuild)"
        );
        return true;
    }
    false
}

/// Two namespaces joined by a veth pair; TX offloads off (full checksums, no GSO frames).
/// Field order = drop order: the veth pair goes before the namespaces.
struct Topo {
    veth: VethPair,
    a: Netns,
    b: Netns,
    mac_a: [u8; 6],
    mac_b: [u8; 6],
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let a = Netns::new(&format!("{tag}a")).expect("create netns A");
        let b = Netns::new(&format!("{tag}b")).expect("create netns B");
        let pid = std::process::id();
        let (ia, ib) = (format!("xa{pid}{tag}"), format!("xb{pid}{tag}"));
        let veth = VethPair::new(&ia, &ib, &a, &b).expect("create veth pair");
        veth.configure(&a, &b, &format!("{IP_A}/24"), &format!("{IP_B}/24"), true)
            .expect("configure veth");
        a.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{IP6_A}/64"),
            "dev",
            &ia,
            "nodad",
        ])
        .expect("IPv6 on A");
        b.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{IP6_B}/64"),
            "dev",
            &ib,
            "nodad",
        ])
        .expect("IPv6 on B");
        let mac_a = {
            let _g = a.enter().expect("enter A");
            route::mac(&ia).expect("MAC of A")
        };
        let mac_b = {
            let _g = b.enter().expect("enter B");
            route::mac(&ib).expect("MAC of B")
        };
        // Static neighbours: the kernel paths need no ARP exchange.
        a.exec(&[
            "ip",
            "neigh",
            "replace",
            &IP_B.to_string(),
            "lladdr",
            &fmt_mac(&mac_b),
            "dev",
            &ia,
        ])
        .expect("neigh A");
        b.exec(&[
            "ip",
            "neigh",
            "replace",
            &IP_A.to_string(),
            "lladdr",
            &fmt_mac(&mac_a),
            "dev",
            &ib,
        ])
        .expect("neigh B");
        Topo {
            veth,
            a,
            b,
            mac_a,
            mac_b,
        }
    }

    fn ia(&self) -> &str {
        &self.veth.a
    }
    fn ib(&self) -> &str {
        &self.veth.b
    }

    fn link_a(&self) -> String {
        self.a
            .exec(&["ip", "link", "show", "dev", self.ia()])
            .expect("ip link show")
    }

    /// Injects `frames` into B's veth end from inside B (AF_PACKET), optionally pinned to `cpu`.
    fn inject(&self, frames: Vec<Vec<u8>>, cpu: Option<usize>) {
        let ib = self.ib().to_owned();
        self.b
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu);
                }
                let tx = RawTx::open(&ib, true).expect("AF_PACKET socket in B");
                for f in &frames {
                    tx.send(f).expect("inject frame");
                }
            })
            .join()
            .expect("injector thread")
            .expect("enter B");
    }
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; pid 0 = this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP header (PSH|ACK, no options) + payload, checksum over `pseudo`.
fn tcp_segment(sport: u16, dport: u16, payload: &[u8], pseudo: u32) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[8..12].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x18;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = csum_fold(csum_add(pseudo, &t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

fn eth(dst: [u8; 6], src: [u8; 6], vlans: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for &(tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Ethernet (+ VLAN tags) / IPv4 / TCP frame from (IP_B, PEER_PORT).
fn tcp4(
    topo: &Topo,
    dst_ip: Ipv4Addr,
    dport: u16,
    payload: &[u8],
    vlans: &[(u16, u16)],
) -> Vec<u8> {
    tcp4_from(topo, (IP_B, PEER_PORT), dst_ip, dport, payload, vlans)
}

/// Ethernet (+ VLAN tags) / IPv4 / TCP frame from `from` (address, port) to (`dst_ip`, `dport`).
fn tcp4_from(
    topo: &Topo,
    from: (Ipv4Addr, u16),
    dst_ip: Ipv4Addr,
    dport: u16,
    payload: &[u8],
    vlans: &[(u16, u16)],
) -> Vec<u8> {
    let (src, dst) = (from.0.octets(), dst_ip.octets());
    let tcp_len = 20 + payload.len();
    let mut pseudo = csum_add(0, &src);
    pseudo = csum_add(pseudo, &dst);
    pseudo += 6 + tcp_len as u32;
    let seg = tcp_segment(from.1, dport, payload, pseudo);
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(topo.mac_a, topo.mac_b, vlans, 0x0800);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&seg);
    f
}

/// Ethernet / IPv6 / TCP frame from (IP6_B, PEER_PORT) to (IP6_A, `dport`).
fn tcp6(topo: &Topo, dport: u16, payload: &[u8]) -> Vec<u8> {
    tcp6_from(topo, PEER_PORT, dport, payload)
}

/// Ethernet / IPv6 / TCP frame from (IP6_B, `sport`) to (IP6_A, `dport`).
fn tcp6_from(topo: &Topo, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (IP6_B.octets(), IP6_A.octets());
    let tcp_len = 20 + payload.len();
    let mut pseudo = csum_add(0, &src);
    pseudo = csum_add(pseudo, &dst);
    pseudo += 6 + tcp_len as u32;
    let seg = tcp_segment(sport, dport, payload, pseudo);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    ip.push(6);
    ip.push(64);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let mut f = eth(topo.mac_a, topo.mac_b, &[], 0x86DD);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&seg);
    f
}

/// Frame A → B (for AF_XDP TX), written into `buf`; returns its length.
fn tcp4_a_to_b(topo: &Topo, payload: &[u8], buf: &mut [u8]) -> usize {
    let (src, dst) = (IP_A.octets(), IP_B.octets());
    let tcp_len = 20 + payload.len();
    let mut pseudo = csum_add(0, &src);
    pseudo = csum_add(pseudo, &dst);
    pseudo += 6 + tcp_len as u32;
    let seg = tcp_segment(TUNNEL_PORT, PEER_PORT, payload, pseudo);
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(topo.mac_b, topo.mac_a, &[], 0x0800);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&seg);
    buf[..f.len()].copy_from_slice(&f);
    f.len()
}

/// TCP payload of an Ethernet(+VLAN)/IPv4|IPv6/TCP frame, with its destination port.
fn tcp_payload(f: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut off = 12;
    let mut et = u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]);
    while et == 0x8100 || et == 0x88A8 {
        off += 4;
        et = u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]);
    }
    let l3 = off + 2;
    let l4 = match et {
        0x0800 => l3 + usize::from(f.get(l3)? & 0x0f) * 4,
        0x86DD => l3 + 40,
        _ => return None,
    };
    let dport = u16::from_be_bytes([*f.get(l4 + 2)?, *f.get(l4 + 3)?]);
    let thl = usize::from(f.get(l4 + 12)? >> 4) * 4;
    let end = match et {
        0x0800 => l3 + usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]])),
        _ => l3 + 40 + usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]])),
    };
    Some((dport, f.get(l4 + thl..end)?.to_vec()))
}

/// True for an Ethernet/IPv4/TCP frame with the RST flag.
fn is_rst(f: &[u8]) -> bool {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return false;
    }
    let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
    f.len() > l4 + 13 && f[l4 + 13] & 0x04 != 0
}

/// Receives until `want` frames arrived or the bounded wait ends; returns their TCP payloads.
fn recv_payloads(io: &mut AfXdpIo, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    for _ in 0..POLLS {
        io.recv_batch(POLL, &mut |f| {
            let (port, p) = tcp_payload(f).expect("AF_XDP delivered a frame that is not TCP");
            assert_eq!(
                port, TUNNEL_PORT,
                "AF_XDP delivered a frame for port {port}"
            );
            got.push(p);
        })
        .expect("recv_batch");
        if got.len() >= want {
            break;
        }
    }
    // Anything extra that is already queued (must not exist).
    io.recv_batch(Duration::from_millis(20), &mut |f| {
        got.push(tcp_payload(f).map(|x| x.1).unwrap_or_default())
    })
    .expect("recv_batch");
    got
}

fn counters(s: &Steering) -> [u64; COUNTERS] {
    s.counters().expect("read XDP counters")
}

/// Reads the counters until `done` holds (bounded; veth usually runs XDP inside the sender's
/// syscall, but may defer it to its NAPI softirq).
fn wait_counters(s: &Steering, done: impl Fn(&[u64; COUNTERS]) -> bool) -> [u64; COUNTERS] {
    for _ in 0..POLLS {
        let c = counters(s);
        if done(&c) {
            return c;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "XDP counters never reached the expected state: {:?}",
        counters(s)
    );
}

fn delta(after: &[u64; COUNTERS], before: &[u64; COUNTERS], c: XdpCounter) -> u64 {
    after[c as usize] - before[c as usize]
}

fn check_identity(c: &[u64; COUNTERS]) {
    let seen = c[XdpCounter::Seen as usize];
    let sum = c[XdpCounter::Steered as usize]
        + c[XdpCounter::Passed as usize]
        + c[XdpCounter::GuardDropped as usize]
        + c[XdpCounter::Empty as usize];
    assert_eq!(
        seen, sum,
        "seen must equal steered + passed + guard_dropped + empty: {c:?}"
    );
}

/// ICMP echo from B to A over a raw socket; true when A's kernel answered.
fn ping_from_b(topo: &Topo) -> bool {
    topo.b
        .spawn(|| {
            // SAFETY: plain socket syscalls on a descriptor we own and close.
            unsafe {
                let fd = libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                );
                assert!(
                    fd >= 0,
                    "raw ICMP socket: {}",
                    std::io::Error::last_os_error()
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let id: u16 = (std::process::id() & 0xffff) as u16;
                let mut req = vec![8u8, 0, 0, 0];
                req.extend_from_slice(&id.to_be_bytes());
                req.extend_from_slice(&1u16.to_be_bytes());
                req.extend_from_slice(b"paqet-xdp-ping");
                let c = csum_fold(csum_add(0, &req));
                req[2..4].copy_from_slice(&c.to_be_bytes());
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_addr.s_addr = u32::from_ne_bytes(IP_A.octets());
                let sent = libc::sendto(
                    fd,
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                assert_eq!(sent as usize, req.len(), "send ICMP echo");
                let mut ok = false;
                let mut buf = [0u8; 1500];
                for _ in 0..20 {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n <= 0 {
                        continue;
                    }
                    let n = n as usize;
                    let ihl = usize::from(buf[0] & 0x0f) * 4;
                    if n >= ihl + 8
                        && buf[12..16] == IP_A.octets()
                        && buf[ihl] == 0
                        && buf[ihl + 4..ihl + 6] == id.to_be_bytes()
                    {
                        ok = true;
                        break;
                    }
                }
                libc::close(fd);
                ok
            }
        })
        .join()
        .expect("ping thread")
        .expect("enter B")
}

/// Kernel TCP from B to A's `OTHER_PORT` (listener in A) while XDP is attached: round trip works.
fn kernel_tcp_roundtrip(topo: &Topo, listener: &TcpListener) {
    let client = topo.b.spawn(|| {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((IP_A, OTHER_PORT)),
            Duration::from_secs(5),
        )
        .expect("kernel TCP connect from B to A");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"ping-over-kernel").expect("write");
        let mut back = [0u8; 16];
        s.read_exact(&mut back).expect("read echo");
        back
    });
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let mut conn = None;
    for _ in 0..POLLS {
        match listener.accept() {
            Ok((s, _)) => {
                conn = Some(s);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => panic!("accept: {e}"),
        }
    }
    let mut s =
        conn.expect("no kernel TCP connection arrived at A's other port while XDP was attached");
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).expect("read from B");
    s.write_all(&buf).expect("echo");
    let back = client.join().expect("client thread").expect("enter B");
    assert_eq!(&back, b"ping-over-kernel");
}

/// Everything in one mode: steering (IPv4, VLAN, QinQ, IPv6), pass-through of other traffic, TX,
/// counters, address filter, guard, detach on drop.
fn end_to_end(mode: XdpMode, tag: &str) {
    let topo = Topo::new(tag);
    let ia = topo.ia().to_owned();
    let _in_a = topo.a.enter().expect("enter A");

    let mut steer = Steering::attach(&ia, mode, SteerConfig::any(TUNNEL_PORT)).expect("attach XDP");
    assert_eq!(steer.attached(), XdpAttach::from(mode));
    let mut io = AfXdpIo::open(AfXdpConfig::new(&ia, 0)).expect("open AF_XDP socket");
    steer.register_socket(0, &io).expect("register socket");

    // Disarmed: tunnel frames go to the kernel, not to the socket.
    let c0 = counters(&steer);
    topo.inject(vec![tcp4(&topo, IP_A, TUNNEL_PORT, b"disarmed", &[])], None);
    let c1 = wait_counters(&steer, |c| delta(c, &c0, XdpCounter::Seen) >= 1);
    let n = io
        .recv_batch(Duration::ZERO, &mut |f| {
            panic!("a disarmed program steered {f:02x?}")
        })
        .expect("recv");
    assert_eq!(n, 0);
    assert_eq!(delta(&c1, &c0, XdpCounter::Steered), 0);
    assert!(delta(&c1, &c0, XdpCounter::Passed) >= 1);

    steer.arm().expect("arm");
    let link = topo.link_a();
    assert!(
        link.contains("xdp"),
        "ip link shows no XDP program while attached: {link}"
    );

    // Tunnel frames: plain IPv4, 802.1Q, QinQ (802.1ad + 802.1Q), IPv6; and frames for other ports.
    let mut frames = Vec::new();
    let mut want = Vec::new();
    for i in 0..8 {
        let p = format!("tunnel-{i}").into_bytes();
        frames.push(tcp4(&topo, IP_A, TUNNEL_PORT, &p, &[]));
        want.push(p);
    }
    frames.push(tcp4(&topo, IP_A, TUNNEL_PORT, b"vlan-1", &[(0x8100, 10)]));
    want.push(b"vlan-1".to_vec());
    frames.push(tcp4(
        &topo,
        IP_A,
        TUNNEL_PORT,
        b"qinq-1",
        &[(0x88A8, 20), (0x8100, 10)],
    ));
    want.push(b"qinq-1".to_vec());
    frames.push(tcp6(&topo, TUNNEL_PORT, b"ipv6-1"));
    want.push(b"ipv6-1".to_vec());
    for i in 0..5 {
        frames.push(tcp4(
            &topo,
            IP_A,
            OTHER_PORT + 1,
            format!("other-{i}").as_bytes(),
            &[],
        ));
    }
    frames.push(tcp6(&topo, OTHER_PORT + 1, b"other-v6"));
    // A truncated frame claiming IPv4 (malformed, passed).
    let mut trunc = tcp4(&topo, IP_A, TUNNEL_PORT, b"x", &[]);
    trunc.truncate(14 + 10);
    frames.push(trunc);
    let before = counters(&steer);
    topo.inject(frames, None);
    let mut got = recv_payloads(&mut io, want.len());
    got.sort();
    want.sort();
    assert_eq!(got, want, "AF_XDP must deliver exactly the tunnel frames");
    let after = wait_counters(&steer, |c| {
        delta(c, &before, XdpCounter::Malformed) >= 1 && delta(c, &before, XdpCounter::Passed) >= 7
    });
    assert_eq!(
        delta(&after, &before, XdpCounter::Steered),
        want.len() as u64
    );
    assert!(
        delta(&after, &before, XdpCounter::Passed) >= 7,
        "other-port and malformed frames pass"
    );
    assert!(
        delta(&after, &before, XdpCounter::Malformed) >= 1,
        "the truncated frame counts as malformed"
    );
    assert_eq!(after[XdpCounter::NoSocket as usize], 0);
    assert_eq!(after[XdpCounter::GuardDropped as usize], 0);
    check_identity(&after);

    // Other traffic reaches A's kernel untouched while steering is armed.
    assert!(
        ping_from_b(&topo),
        "ICMP echo from B to A got no reply while XDP was attached"
    );
    let listener = TcpListener::bind((IP_A, OTHER_PORT)).expect("listen in A");
    let before = counters(&steer);
    kernel_tcp_roundtrip(&topo, &listener);
    let after = counters(&steer);
    assert_eq!(
        delta(&after, &before, XdpCounter::Steered),
        0,
        "kernel TCP to another port must not be steered"
    );
    assert!(delta(&after, &before, XdpCounter::Passed) >= 3);

    // TX: frames written into UMEM with send_with arrive at B (captured with the pcap backend).
    let before_tx = counters(&steer);
    let ib = topo.ib().to_owned();
    let (ready_tx, ready_rx) = mpsc::channel();
    let capture = topo.b.spawn(move || {
        let mut pc = PcapIo::open(PcapConfig::new(&ib, PEER_PORT)).expect("pcap in B");
        ready_tx.send(()).expect("ready");
        let mut got: Vec<Vec<u8>> = Vec::new();
        for _ in 0..POLLS {
            pc.recv_batch(POLL, &mut |f| {
                got.push(tcp_payload(f).expect("TCP frame").1)
            })
            .expect("pcap recv");
            if got.len() >= 20 {
                break;
            }
        }
        got
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("pcap capture ready");
    let mut sent = Vec::new();
    for i in 0..20 {
        let p = format!("from-a-{i:02}").into_bytes();
        io.send_with(1514, &mut |buf| tcp4_a_to_b(&topo, &p, buf))
            .expect("send_with");
        sent.push(p);
    }
    io.flush().expect("flush");
    let mut got = capture.join().expect("capture thread").expect("enter B");
    got.sort();
    assert_eq!(got, sent, "frames sent through AF_XDP must arrive at B");
    // B's kernel has no socket on PEER_PORT and answers each frame with a RST to the tunnel port. A frame
    // without a payload is never a tunnel datagram: the program keeps it from AF_XDP and from A's kernel
    // and counts it as `empty` (an RST gets no answer, as from a closed port).
    let after = wait_counters(&steer, |c| delta(c, &before_tx, XdpCounter::Empty) >= 20);
    assert_eq!(
        delta(&after, &before_tx, XdpCounter::Empty),
        20,
        "each frame sent to B is answered by a RST, which the program keeps from AF_XDP"
    );
    assert_eq!(delta(&after, &before_tx, XdpCounter::Steered), 0);
    check_identity(&after);
    let mut stray = Vec::new();
    io.recv_batch(POLL, &mut |f| stray.push(f.to_vec()))
        .expect("recv after TX");
    assert!(
        stray.is_empty(),
        "{} frames ({} RSTs) reached AF_XDP after TX",
        stray.len(),
        stray.iter().filter(|f| is_rst(f)).count()
    );
    let st = io.stats();
    assert_eq!(st.tx_frames, 20);
    assert_eq!(st.rx_frames, want.len() as u64);
    assert_eq!(st.xsk_tx_invalid_descs, 0);
    assert_eq!(st.xsk_rx_dropped, 0);
    // A frame that does not fit is refused, and `fill` returning 0 sends nothing.
    assert!(io.send_with(8192, &mut |_| 0).is_err());
    io.send_with(100, &mut |_| 0).expect("empty fill");
    assert_eq!(io.stats().tx_frames, 20);

    // Address filter: only frames to IP_A are steered.
    let mut cfg = SteerConfig::any(TUNNEL_PORT);
    cfg.flags |= SteerConfig::FLAG_IPV4_ADDR;
    cfg.ipv4 = IP_A.octets();
    steer.set_config(cfg).expect("set config");
    let before = counters(&steer);
    topo.inject(
        vec![
            tcp4(&topo, IP_A, TUNNEL_PORT, b"to-a", &[]),
            tcp4(
                &topo,
                Ipv4Addr::new(10, 231, 0, 99),
                TUNNEL_PORT,
                b"to-99",
                &[],
            ),
        ],
        None,
    );
    assert_eq!(recv_payloads(&mut io, 1), vec![b"to-a".to_vec()]);
    let after = wait_counters(&steer, |c| delta(c, &before, XdpCounter::Seen) >= 2);
    assert_eq!(delta(&after, &before, XdpCounter::Steered), 1);

    // Guard: only payloads starting with a listed magic|cookie reach the socket.
    let good: [u8; 12] = *b"PQT1\x01\x02\x03\x04\x05\x06\x07\x08";
    let next: [u8; 12] = *b"PQT1\x11\x12\x13\x14\x15\x16\x17\x18";
    steer
        .set_guard_cookies(&[good, next])
        .expect("guard cookies");
    cfg.flags |= SteerConfig::FLAG_GUARD;
    steer.set_config(cfg).expect("guard on");
    let with_prefix = |pre: &[u8], body: &str| {
        let mut p = pre.to_vec();
        p.extend_from_slice(body.as_bytes());
        p
    };
    let mut frames = Vec::new();
    let mut want = Vec::new();
    for i in 0..4 {
        let p = with_prefix(if i % 2 == 0 { &good } else { &next }, &format!("good-{i}"));
        frames.push(tcp4(&topo, IP_A, TUNNEL_PORT, &p, &[]));
        want.push(p);
    }
    for i in 0..3 {
        frames.push(tcp4(
            &topo,
            IP_A,
            TUNNEL_PORT,
            &with_prefix(b"PQT1\x09\x09\x09\x09\x09\x09\x09\x09", &format!("bad-{i}")),
            &[],
        ));
    }
    frames.push(tcp4(
        &topo,
        IP_A,
        TUNNEL_PORT,
        &with_prefix(b"XXXX\x01\x02\x03\x04\x05\x06\x07\x08", "bad-magic"),
        &[],
    ));
    frames.push(tcp4(&topo, IP_A, TUNNEL_PORT, b"short", &[]));
    let before = counters(&steer);
    topo.inject(frames, None);
    let mut got = recv_payloads(&mut io, want.len());
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "with the guard on only valid prefixes reach AF_XDP"
    );
    let after = wait_counters(&steer, |c| delta(c, &before, XdpCounter::GuardDropped) >= 5);
    assert_eq!(delta(&after, &before, XdpCounter::GuardDropped), 5);
    assert_eq!(delta(&after, &before, XdpCounter::Steered), 4);
    check_identity(&after);
    // Rotation: `good` expires, only `next` stays valid.
    steer.set_guard_cookies(&[next]).expect("rotate");
    let before = counters(&steer);
    topo.inject(
        vec![
            tcp4(
                &topo,
                IP_A,
                TUNNEL_PORT,
                &with_prefix(&good, "expired"),
                &[],
            ),
            tcp4(
                &topo,
                IP_A,
                TUNNEL_PORT,
                &with_prefix(&next, "current"),
                &[],
            ),
        ],
        None,
    );
    assert_eq!(
        recv_payloads(&mut io, 1),
        vec![with_prefix(&next, "current")]
    );
    let after = wait_counters(&steer, |c| delta(c, &before, XdpCounter::GuardDropped) >= 1);
    assert_eq!(delta(&after, &before, XdpCounter::GuardDropped), 1);
    assert_eq!(
        io.refill_backlog(),
        0,
        "all RX frames are back in the fill ring"
    );

    // Dropping detaches the program.
    drop(io);
    drop(steer);
    let link = topo.link_a();
    assert!(
        !link.contains("xdp"),
        "XDP program still attached after drop: {link}"
    );
}

#[test]
fn xdp_afxdp_native_mode() {
    if skip("xdp_afxdp_native_mode") {
        return;
    }
    end_to_end(XdpMode::Native, "xn");
}

#[test]
fn xdp_afxdp_generic_mode() {
    if skip("xdp_afxdp_generic_mode") {
        return;
    }
    end_to_end(XdpMode::Generic, "xg");
}

/// Two RX queues (`ethtool -L rx 2 tx 2` on both ends), a socket per queue. Frames injected from
/// B pinned to CPU 0 and CPU 1 land on different queues (veth native XDP uses the TX queue the
/// sender picked, and AF_PACKET with qdisc bypass picks it by CPU). A queue without a socket
/// falls back to XDP_PASS.
#[test]
fn xdp_afxdp_two_queues() {
    if skip("xdp_afxdp_two_queues") {
        return;
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus < 2 {
        eprintln!("skipping xdp_afxdp_two_queues: needs 2 CPUs, have {cpus}");
        return;
    }
    let topo = Topo::new("xq");
    let (ia, ib) = (topo.ia().to_owned(), topo.ib().to_owned());
    topo.a
        .exec(&["ethtool", "-L", &ia, "rx", "2", "tx", "2"])
        .expect("2 channels on A");
    topo.b
        .exec(&["ethtool", "-L", &ib, "rx", "2", "tx", "2"])
        .expect("2 channels on B");
    let _in_a = topo.a.enter().expect("enter A");
    capture_logs();
    let (mut steer, how) =
        Steering::attach_auto(&ia, SteerConfig::any(TUNNEL_PORT)).expect("attach XDP");
    assert_eq!(how, XdpAttach::Native, "veth supports native XDP");
    let mut q0 = AfXdpIo::open(AfXdpConfig::new(&ia, 0)).expect("socket on queue 0");
    steer.register_socket(0, &q0).expect("register queue 0");
    steer.arm().expect("arm");

    let batch = |cpu: usize| -> Vec<Vec<u8>> {
        (0..8)
            .map(|i| {
                tcp4(
                    &topo,
                    IP_A,
                    TUNNEL_PORT,
                    format!("cpu{cpu}-{i}").as_bytes(),
                    &[],
                )
            })
            .collect()
    };
    // Only queue 0 has a socket: the frames landing on queue 1 are passed (no_socket).
    topo.inject(batch(0), Some(0));
    topo.inject(batch(1), Some(1));
    let c = wait_counters(&steer, |c| {
        c[XdpCounter::Steered as usize] + c[XdpCounter::NoSocket as usize] >= 16
    });
    let first = recv_payloads(&mut q0, c[XdpCounter::Steered as usize] as usize);
    assert_eq!(c[XdpCounter::Steered as usize], first.len() as u64);
    assert_eq!(
        first.len() as u64 + c[XdpCounter::NoSocket as usize],
        16,
        "every tunnel frame is steered or passed"
    );
    assert!(
        c[XdpCounter::NoSocket as usize] > 0,
        "no frame landed on queue 1: {c:?}"
    );
    // The program logged the first of them (once per CPU, aya-log), never each frame.
    steer.flush_logs();
    let logged: Vec<String> = captured()
        .into_iter()
        .filter(|l| l.contains("no AF_XDP socket"))
        .collect();
    assert!(
        !logged.is_empty()
            && logged.len() as u64 <= c[XdpCounter::NoSocket as usize].min(cpus as u64),
        "no-socket log records: {logged:?} for {} frames",
        c[XdpCounter::NoSocket as usize]
    );
    assert!(
        logged[0].starts_with("WARN tunnel frame on RX queue 1 "),
        "{logged:?}"
    );

    let mut q1 = AfXdpIo::open(AfXdpConfig::new(&ia, 1)).expect("socket on queue 1");
    steer.register_socket(1, &q1).expect("register queue 1");
    let before = counters(&steer);
    topo.inject(batch(0), Some(0));
    topo.inject(batch(1), Some(1));
    let (mut got0, mut got1) = (Vec::new(), Vec::new());
    for _ in 0..POLLS {
        for (io, got) in [(&mut q0, &mut got0), (&mut q1, &mut got1)] {
            io.recv_batch(Duration::from_millis(10), &mut |f| {
                got.push(tcp_payload(f).expect("TCP").1)
            })
            .expect("recv");
        }
        if got0.len() + got1.len() >= 16 {
            break;
        }
    }
    let after = counters(&steer);
    assert_eq!(
        got0.len() + got1.len(),
        16,
        "all frames arrive on one of the two sockets"
    );
    assert!(
        !got0.is_empty() && !got1.is_empty(),
        "both queues received frames: q0={} q1={}",
        got0.len(),
        got1.len()
    );
    assert_eq!(delta(&after, &before, XdpCounter::NoSocket), 0);
    assert_eq!(delta(&after, &before, XdpCounter::Steered), 16);
    // Frames from one CPU all land on the same queue.
    for got in [&got0, &got1] {
        let first = String::from_utf8_lossy(&got[0][..4]).into_owned();
        assert!(
            got.iter().all(|p| p.starts_with(first.as_bytes())),
            "mixed CPUs on one queue: {got:?}"
        );
    }
    drop(q0);
    drop(q1);
    drop(steer);
    assert!(
        !topo.link_a().contains("xdp"),
        "XDP program still attached after drop"
    );
}

/// Receives until `want` frames arrived or the bounded wait ends (plus whatever else is queued);
/// returns (destination port, TCP payload) of each.
fn recv_any_port(io: &mut AfXdpIo, want: usize) -> Vec<(u16, Vec<u8>)> {
    let mut got = Vec::new();
    for _ in 0..POLLS {
        io.recv_batch(POLL, &mut |f| {
            got.push(tcp_payload(f).expect("AF_XDP delivered a frame that is not TCP"))
        })
        .expect("recv_batch");
        if got.len() >= want {
            break;
        }
    }
    io.recv_batch(Duration::from_millis(20), &mut |f| {
        got.push(tcp_payload(f).unwrap_or_default())
    })
    .expect("recv_batch");
    got.sort();
    got
}

/// Client-side steering (`FLAG_SRC_*`): frames from the server endpoint (IP_B / IP6_B, PEER_PORT) to our
/// address and to one of our session ports (the port set) reach the socket; frames from the server to a
/// port NOT in the set (another client on this host), from another source port or address, or to another
/// destination address, pass to the kernel. The guard applies to them too.
#[test]
fn xdp_afxdp_client_source_match() {
    if skip("xdp_afxdp_client_source_match") {
        return;
    }
    let topo = Topo::new("xc");
    let ia = topo.ia().to_owned();
    let _in_a = topo.a.enter().expect("enter A");
    let mut cfg = SteerConfig::from_peer_v4(IP_B.octets(), PEER_PORT);
    cfg.flags |= SteerConfig::FLAG_IPV4_ADDR | SteerConfig::FLAG_IPV6 | SteerConfig::FLAG_SRC_IPV6;
    cfg.ipv4 = IP_A.octets();
    cfg.src_ipv6 = IP6_B.octets();
    assert_eq!(cfg.port, 0, "no destination-port match on a client");
    let mut steer = Steering::attach(&ia, XdpMode::Native, cfg).expect("attach XDP");
    let mut io = AfXdpIo::open(AfXdpConfig::new(&ia, 0)).expect("open AF_XDP socket");
    steer.register_socket(0, &io).expect("register socket");
    // Our session ports; 40005 is added and removed again, so it ends up not ours.
    let ours = [
        40001u16,
        40002,
        40003,
        40004,
        40011,
        40012,
        40013,
        50000,
        65535,
        TUNNEL_PORT,
        1,
    ];
    steer
        .add_ports(ours.iter().copied().chain([40005]))
        .expect("session ports");
    {
        let set = steer.port_set();
        let mut set = set.lock().unwrap();
        assert!(set.remove(40005).expect("remove port"));
        assert!(
            !set.insert(40001).expect("insert again"),
            "40001 was already in the set"
        );
        assert!(set.insert(0).is_err(), "port 0 must be refused");
        let mut sorted = ours.to_vec();
        sorted.sort();
        assert_eq!(set.ports(), sorted);
    }
    steer.arm().expect("arm");

    let server = (IP_B, PEER_PORT);
    let mut frames = Vec::new();
    let mut want = Vec::new();
    for (i, dport) in [40001u16, 40002, 50000, 65535, TUNNEL_PORT, 1]
        .into_iter()
        .enumerate()
    {
        let p = format!("from-server-{i}").into_bytes();
        frames.push(tcp4_from(&topo, server, IP_A, dport, &p, &[]));
        want.push((dport, p));
    }
    frames.push(tcp4_from(
        &topo,
        server,
        IP_A,
        40003,
        b"vlan-from-server",
        &[(0x8100, 7)],
    ));
    want.push((40003, b"vlan-from-server".to_vec()));
    frames.push(tcp6_from(&topo, PEER_PORT, 40004, b"v6-from-server"));
    want.push((40004, b"v6-from-server".to_vec()));
    // Not from the server endpoint, not to our address, or from the server to a port that is not one of
    // our sessions' (another client on this host): passed.
    let others = vec![
        tcp4_from(&topo, server, IP_A, 40005, b"not-our-port", &[]),
        tcp4_from(&topo, server, IP_A, 40000, b"not-our-port-2", &[]),
        tcp6_from(&topo, PEER_PORT, 40006, b"v6-not-our-port"),
        tcp4_from(
            &topo,
            (IP_B, PEER_PORT + 1),
            IP_A,
            40001,
            b"other-sport",
            &[],
        ),
        tcp4_from(
            &topo,
            (Ipv4Addr::new(10, 231, 0, 77), PEER_PORT),
            IP_A,
            40001,
            b"other-src",
            &[],
        ),
        tcp4_from(
            &topo,
            server,
            Ipv4Addr::new(10, 231, 0, 99),
            40001,
            b"other-dst",
            &[],
        ),
        tcp6_from(&topo, PEER_PORT + 1, 40004, b"v6-other-sport"),
    ];
    let n_others = others.len() as u64;
    frames.extend(others);
    let before = counters(&steer);
    topo.inject(frames, None);
    let got = recv_any_port(&mut io, want.len());
    want.sort();
    assert_eq!(
        got, want,
        "AF_XDP must deliver exactly the frames from the server endpoint"
    );
    let after = wait_counters(&steer, |c| {
        delta(c, &before, XdpCounter::Passed) >= n_others
    });
    assert_eq!(
        delta(&after, &before, XdpCounter::Steered),
        want.len() as u64
    );
    assert_eq!(delta(&after, &before, XdpCounter::Malformed), 0);
    check_identity(&after);

    // The guard applies to client-side steering too.
    let good: [u8; 12] = *b"PQT1\x21\x22\x23\x24\x25\x26\x27\x28";
    steer.set_guard_cookies(&[good]).expect("guard cookies");
    cfg.flags |= SteerConfig::FLAG_GUARD;
    steer.set_config(cfg).expect("guard on");
    let mut with_good = good.to_vec();
    with_good.extend_from_slice(b"guarded");
    let before = counters(&steer);
    topo.inject(
        vec![
            tcp4_from(&topo, server, IP_A, 40011, &with_good, &[]),
            tcp4_from(
                &topo,
                server,
                IP_A,
                40012,
                b"PQT1\x00\x00\x00\x00\x00\x00\x00\x00bad",
                &[],
            ),
            tcp4_from(&topo, server, IP_A, 40013, b"short", &[]),
        ],
        None,
    );
    assert_eq!(recv_any_port(&mut io, 1), vec![(40011, with_good)]);
    let after = wait_counters(&steer, |c| delta(c, &before, XdpCounter::GuardDropped) >= 2);
    assert_eq!(delta(&after, &before, XdpCounter::GuardDropped), 2);
    assert_eq!(delta(&after, &before, XdpCounter::Steered), 1);
    check_identity(&after);

    // Disarmed (all-zero config): nothing is steered, not even frames from the server.
    steer.disarm().expect("disarm");
    let before = counters(&steer);
    topo.inject(
        vec![tcp4_from(&topo, server, IP_A, 40001, &good, &[])],
        None,
    );
    let after = wait_counters(&steer, |c| delta(c, &before, XdpCounter::Seen) >= 1);
    assert_eq!(delta(&after, &before, XdpCounter::Steered), 0);
    assert_eq!(
        io.recv_batch(Duration::from_millis(20), &mut |f| panic!(
            "steered while disarmed: {f:02x?}"
        ))
        .unwrap(),
        0
    );
    drop(io);
    drop(steer);
    assert!(
        !topo.link_a().contains("xdp"),
        "XDP program still attached after drop"
    );
}
