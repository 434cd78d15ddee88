//! Root-only tests of the pcap backend and the route lookups over a veth pair joining two
//! private network namespaces (`pq<pid><tag>a` / `pq<pid><tag>b`, 10.213.<k>.1/.2/24 and
//! fd00:213:<k>::1/.2/64 inside only). Skipped with a message when not root.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use paqet::io::pcap::{PcapConfig, PcapIo, TxMethod};
use paqet::io::route;
use paqet::io::PacketIo;
use paqet_testkit::netns::{is_root, Netns, VethPair};

/// Port the receiver listens on; frames to `PORT + 1` must be filtered out.
const PORT: u16 = 7913;
/// Payload marking the last frame of a run.
const END: &[u8] = b"END-OF-RUN";

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipping: needs root (network namespaces, raw sockets)");
        return true;
    }
    false
}

/// Two namespaces joined by a veth pair with IPv4 and IPv6 addresses and TX offload off.
struct Topo {
    ns_a: Netns,
    ns_b: Netns,
    veth: VethPair,
    ip_a: Ipv4Addr,
    ip_b: Ipv4Addr,
    k: u32,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let ns_a = Netns::new(&format!("{tag}a")).expect("create netns A");
        let ns_b = Netns::new(&format!("{tag}b")).expect("create netns B");
        let pid = std::process::id();
        let veth = VethPair::new(
            &format!("pq{pid}{tag}a"),
            &format!("pq{pid}{tag}b"),
            &ns_a,
            &ns_b,
        )
        .expect("create veth pair");
        let k = pid % 250 + 1;
        veth.configure(
            &ns_a,
            &ns_b,
            &format!("10.213.{k}.1/24"),
            &format!("10.213.{k}.2/24"),
            true,
        )
        .expect("configure IPv4");
        veth.configure(
            &ns_a,
            &ns_b,
            &format!("fd00:213:{k}::1/64"),
            &format!("fd00:213:{k}::2/64"),
            false,
        )
        .expect("configure IPv6");
        Topo {
            ip_a: Ipv4Addr::new(10, 213, k as u8, 1),
            ip_b: Ipv4Addr::new(10, 213, k as u8, 2),
            ns_a,
            ns_b,
            veth,
            k,
        }
    }
}

/// Extracts every string value of `"key":"..."` from `ip -j` output.
fn json_strings(json: &str, key: &str) -> Vec<String> {
    let pat = format!("\"{key}\":\"");
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find(&pat) {
        rest = &rest[i + pat.len()..];
        let end = rest.find('"').expect("unterminated JSON string");
        out.push(rest[..end].to_owned());
        rest = &rest[end..];
    }
    out
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        let mut it = c.chunks_exact(2);
        for w in &mut it {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [b] = it.remainder() {
            sum += u32::from(*b) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes Ethernet/IPv4/TCP(PSH|ACK) + payload into `buf`; returns the frame length.
#[allow(clippy::too_many_arguments)]
fn build_frame(
    buf: &mut [u8],
    smac: [u8; 6],
    dmac: [u8; 6],
    sip: Ipv4Addr,
    dip: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> usize {
    let total = 14 + 20 + 20 + payload.len();
    let f = &mut buf[..total];
    f[0..6].copy_from_slice(&dmac);
    f[6..12].copy_from_slice(&smac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (total - 14) as u16;
    {
        let ip = &mut f[14..34];
        ip.copy_from_slice(&[
            0x45, 0xb8, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[12..16].copy_from_slice(&sip.octets());
        ip[16..20].copy_from_slice(&dip.octets());
        let c = checksum(&[ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    {
        let (head, tcp) = f.split_at_mut(34);
        let _ = head;
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[8..12].copy_from_slice(&2000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18;
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        tcp[16..20].fill(0);
        tcp[20..].copy_from_slice(payload);
        let tcp_len = (tcp.len() as u16).to_be_bytes();
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&sip.octets());
        pseudo[4..8].copy_from_slice(&dip.octets());
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&tcp_len);
        let c = checksum(&[&pseudo, tcp]);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
    }
    total
}

/// What the receiver saw.
#[derive(Debug, Default)]
struct RxReport {
    frames: u64,
    bytes: u64,
    wrong_port: u64,
    bad_ip_csum: u64,
    seen: Vec<bool>,
    end_seen: bool,
    kernel_drops: u64,
    elapsed: Duration,
}

/// Opens a pcap receiver on `iface` in `ns`, signals readiness, then collects frames until the
/// END marker (or a generous safety limit so a broken build fails instead of hanging).
fn spawn_receiver(
    ns: &Netns,
    iface: String,
    expect: usize,
) -> (
    mpsc::Receiver<()>,
    std::thread::JoinHandle<std::io::Result<RxReport>>,
) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = ns.spawn(move || {
        let mut cfg = PcapConfig::new(iface.clone(), PORT);
        cfg.sockbuf = 64 * 1024 * 1024;
        let mut io = PcapIo::open(cfg).unwrap_or_else(|e| panic!("open receiver: {e}"));
        ready_tx.send(()).expect("signal ready");
        let mut r = RxReport {
            seen: vec![false; expect],
            ..Default::default()
        };
        let mut first: Option<Instant> = None;
        let limit = Instant::now() + Duration::from_secs(60);
        while !r.end_seen && Instant::now() < limit {
            io.recv_batch(Duration::from_millis(200), &mut |f: &[u8]| {
                first.get_or_insert_with(Instant::now);
                r.frames += 1;
                r.bytes += f.len() as u64;
                let dport = u16::from_be_bytes([f[36], f[37]]);
                if dport != PORT {
                    r.wrong_port += 1;
                }
                if checksum(&[&f[14..34]]) != 0 {
                    r.bad_ip_csum += 1;
                }
                let payload = &f[54..];
                if payload == END {
                    r.end_seen = true;
                } else {
                    let i = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        as usize;
                    r.seen[i] = true;
                }
            })
            .expect("recv_batch");
        }
        r.elapsed = first.map(|t| t.elapsed()).unwrap_or_default();
        let st = io.stats();
        assert_eq!(st.rx_frames, r.frames, "backend counter vs callback count");
        assert_eq!(
            st.rx_bytes, r.bytes,
            "backend byte counter vs callback bytes"
        );
        r.kernel_drops = st.kernel_drops;
        r
    });
    (ready_rx, h)
}

#[test]
fn pcap_delivers_filtered_frames_and_route_resolves() {
    if skip() {
        return;
    }
    let t = Topo::new("f");
    let (ready, rx) = spawn_receiver(&t.ns_b, t.veth.b.clone(), 1000);
    ready.recv().expect("receiver ready");

    // Expected values from iproute2's own view.
    let link_b = t
        .ns_b
        .exec(&["ip", "-j", "link", "show", &t.veth.b])
        .unwrap();
    let mac_b_ip = json_strings(&link_b, "address")[0].clone();
    let link_a = t
        .ns_a
        .exec(&["ip", "-j", "link", "show", &t.veth.a])
        .unwrap();
    let mac_a_ip = json_strings(&link_a, "address")[0].clone();
    let addr_a = t
        .ns_a
        .exec(&["ip", "-j", "addr", "show", &t.veth.a])
        .unwrap();
    let locals_a = json_strings(&addr_a, "local");

    let _in_a = t.ns_a.enter().expect("enter netns A");
    let iface = t.veth.a.as_str();

    // Interface facts.
    let info = route::link_info(iface).unwrap();
    let mac_a = info.mac.expect("veth has a MAC");
    assert_eq!(route::format_mac(&mac_a), mac_a_ip);
    assert_eq!(info.mtu, 1500);
    assert_eq!(route::mtu(iface).unwrap(), 1500);
    let ifindex_ip: u32 = link_a
        .split("\"ifindex\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("ifindex in ip -j link");
    assert_eq!(route::ifindex(iface).unwrap(), ifindex_ip);
    assert_eq!(route::ipv4_addr(iface).unwrap(), t.ip_a);
    let v6: std::net::Ipv6Addr = format!("fd00:213:{}::1", t.k).parse().unwrap();
    assert_eq!(route::ipv6_addr(iface).unwrap(), v6);
    let ours: Vec<String> = route::addresses(iface)
        .unwrap()
        .iter()
        .map(|a| a.addr.to_string())
        .collect();
    for l in &locals_a {
        assert!(ours.contains(l), "{l} from ip -j addr missing in {ours:?}");
    }

    // Next hop on-link, then via a gateway; both resolve to B's MAC (neighbour probe included).
    let hop = route::next_hop(iface, IpAddr::V4(t.ip_b)).unwrap();
    assert_eq!(hop.addr, IpAddr::V4(t.ip_b));
    assert!(!hop.via_gateway);
    let mac_b = route::resolve_router_mac(iface, IpAddr::V4(t.ip_b)).unwrap();
    assert_eq!(route::format_mac(&mac_b), mac_b_ip);
    t.ns_a
        .exec(&[
            "ip",
            "route",
            "add",
            "10.99.0.0/16",
            "via",
            &t.ip_b.to_string(),
        ])
        .unwrap();
    let hop = route::next_hop(iface, "10.99.1.1".parse().unwrap()).unwrap();
    assert_eq!(
        hop,
        route::NextHop {
            addr: IpAddr::V4(t.ip_b),
            via_gateway: true,
            ifindex: ifindex_ip,
            src: Some(IpAddr::V4(t.ip_a))
        }
    );
    assert_eq!(
        route::resolve_router_mac(iface, "10.99.1.1".parse().unwrap()).unwrap(),
        mac_b
    );
    // IPv6 neighbour discovery.
    let v6_b: IpAddr = format!("fd00:213:{}::2", t.k).parse().unwrap();
    assert_eq!(route::resolve_router_mac(iface, v6_b).unwrap(), mac_b);
    // Nobody answers for .77: a clear error naming the config key.
    let ghost: IpAddr = format!("10.213.{}.77", t.k).parse().unwrap();
    let e = route::resolve_router_mac_within(iface, ghost, Duration::from_millis(300)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("cannot resolve router_mac for {ghost} via {iface}: no neighbour entry; set network.ipv4.router_mac")
    );

    // 1000 frames to PORT interleaved with 1000 to PORT+1, then the END marker.
    let mut tx = PcapIo::open(PcapConfig::new(iface, 40000)).unwrap();
    let payload_len = 1400 - 54;
    let mut payload = vec![0xa5u8; payload_len];
    let mut sent_bytes = 0u64;
    for i in 0..1000u32 {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        for port in [PORT, PORT + 1] {
            tx.send_with(1514, &mut |buf: &mut [u8]| {
                build_frame(buf, mac_a, mac_b, t.ip_a, t.ip_b, 40000, port, &payload)
            })
            .unwrap();
        }
        sent_bytes += 1400;
    }
    let mut buf = [0u8; 128];
    let n = build_frame(&mut buf, mac_a, mac_b, t.ip_a, t.ip_b, 40000, PORT, END);
    tx.send(&buf[..n]).unwrap();
    tx.flush().unwrap();
    let st = tx.stats();
    assert_eq!(st.tx_frames, 2001);
    assert_eq!(st.tx_errors, 0);
    // A's handle only ever captures frames to its own port 40000 (B's kernel answers with RSTs).
    let mut other = 0;
    tx.recv_batch(Duration::ZERO, &mut |f: &[u8]| {
        if u16::from_be_bytes([f[36], f[37]]) != 40000 {
            other += 1;
        }
    })
    .unwrap();
    assert_eq!(other, 0, "A's capture delivered frames to another port");

    let r = rx.join().expect("receiver thread").expect("receiver netns");
    assert!(r.end_seen, "END marker not received: {r:?}");
    assert_eq!(
        r.wrong_port,
        0,
        "frames to port {} leaked through the filter",
        PORT + 1
    );
    assert_eq!(r.bad_ip_csum, 0);
    assert_eq!(
        r.frames, 1001,
        "received {} frames (kernel drops {})",
        r.frames, r.kernel_drops
    );
    assert_eq!(r.bytes, sent_bytes + n as u64);
    assert!(r.seen.iter().all(|&s| s), "some frame indices missing");
}

#[test]
fn errors_name_interface() {
    if skip() {
        return;
    }
    let ns = Netns::new("e").expect("netns");
    let _in = ns.enter().expect("enter");
    let e = PcapIo::open(PcapConfig::new("eth9", 1))
        .err()
        .expect("eth9 must not exist in a fresh netns");
    assert_eq!(e.to_string(), "interface \"eth9\" not found");
    let e = route::resolve_router_mac("eth9", "10.0.0.1".parse().unwrap()).unwrap_err();
    assert_eq!(e.to_string(), "interface \"eth9\" not found");
    // Only `lo` exists: no route to anywhere through it except local addresses.
    let e = route::next_hop("lo", "192.0.2.1".parse().unwrap()).unwrap_err();
    assert!(matches!(e, route::RouteError::NoRoute { .. }), "{e:?}");
}

/// Reads one `/sys/class/net/<dev>/statistics/<name>` counter inside `ns`.
fn dev_counter(ns: &Netns, dev: &str, name: &str) -> u64 {
    ns.exec(&["cat", &format!("/sys/class/net/{dev}/statistics/{name}")])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Measures AF_PACKET `send` (with and without PACKET_QDISC_BYPASS), AF_PACKET `sendmmsg`
/// (batch 32) and `pcap_sendpacket` with
/// 1400-byte frames (3 rounds each, alternating) and checks every method delivers (B's veth RX
/// counter). Frames carry a foreign destination MAC so B's stack drops them early and only the
/// TX path is exercised. Every method must deliver every frame; the rates are printed for information
/// only (`--nocapture`), never asserted.
#[test]
fn tx_methods_all_deliver() {
    if skip() {
        return;
    }
    const N: u64 = 5_000;
    let t = Topo::new("t");
    let _in_a = t.ns_a.enter().unwrap();
    let iface = t.veth.a.as_str();
    let mac_a = route::mac(iface).unwrap();
    let foreign = [0x02, 0, 0, 0, 0, 0x01];
    let payload = vec![0u8; 1400 - 54];
    let mut frame = [0u8; 1400];
    build_frame(
        &mut frame, mac_a, foreign, t.ip_a, t.ip_b, 40000, PORT, &payload,
    );
    for round in 0..1 {
        for (method, batch, bypass) in [
            (TxMethod::AfPacket, 1, false),
            (TxMethod::AfPacket, 1, true),
            (TxMethod::AfPacket, 32, false),
            (TxMethod::Pcap, 1, false),
        ] {
            let mut cfg = PcapConfig::new(iface, 40000);
            cfg.tx = method;
            cfg.tx_batch = batch;
            cfg.qdisc_bypass = bypass;
            let mut tx = PcapIo::open(cfg).unwrap();
            let before = dev_counter(&t.ns_b, &t.veth.b, "rx_packets");
            let start = Instant::now();
            for _ in 0..N {
                tx.send_with(1514, &mut |buf: &mut [u8]| {
                    buf[..1400].copy_from_slice(&frame);
                    1400
                })
                .unwrap();
            }
            tx.flush().unwrap();
            let el = start.elapsed();
            let delivered = dev_counter(&t.ns_b, &t.veth.b, "rx_packets") - before;
            eprintln!(
                "round {round} {method:?} batch {batch} qdisc_bypass {bypass}: {:.0} kpps ({:.2} Gbit/s), B rx_packets +{delivered}",
                N as f64 / el.as_secs_f64() / 1e3,
                N as f64 * 1400.0 * 8.0 / el.as_secs_f64() / 1e9,
            );
            assert_eq!(tx.stats().tx_frames, N);
            assert!(
                delivered >= N,
                "{method:?}: only {delivered} of {N} frames delivered"
            );
        }
    }
}

/// A burst the size of a fast3 KCP window (2,000 MTU-sized frames) arrives while nobody reads: the default
/// 4 MiB capture buffer must hold all of it. With upstream's snap length of 65536 and GSO on (veth's and
/// most NICs' default), libpcap's immediate-mode ring has ~64 KiB slots and keeps only ~64 of them.
#[test]
fn default_capture_buffer_holds_a_window_burst() {
    if skip() {
        return;
    }
    const BURST: u32 = 2000;
    let t = Topo::new("w");
    t.ns_b
        .exec(&["ethtool", "-K", &t.veth.b, "gso", "on", "gro", "on"])
        .expect("turn GSO/GRO on for the receiver");
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let iface_b = t.veth.b.clone();
    let rx = t.ns_b.spawn(move || {
        let cfg = PcapConfig::new(iface_b, PORT);
        assert_eq!(cfg.sockbuf, 4 * 1024 * 1024, "upstream's client default");
        let mut io = PcapIo::open(cfg).unwrap_or_else(|e| panic!("open receiver: {e}"));
        ready_tx.send(()).expect("signal ready");
        // Not reading until the whole burst has been sent.
        go_rx.recv().expect("burst sent");
        std::thread::sleep(Duration::from_millis(200));
        let mut frames = 0u64;
        let limit = Instant::now() + Duration::from_secs(20);
        while frames < u64::from(BURST) && Instant::now() < limit {
            io.recv_batch(Duration::from_millis(100), &mut |_f: &[u8]| frames += 1)
                .expect("capture read");
        }
        (frames, io.stats().kernel_drops)
    });
    ready_rx.recv().expect("receiver ready");
    let mac = |ns: &Netns, dev: &str| -> [u8; 6] {
        let j = ns.exec(&["ip", "-j", "link", "show", dev]).unwrap();
        let s = json_strings(&j, "address")[0].clone();
        let v: Vec<u8> = s
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        v.try_into().unwrap()
    };
    let (mac_a, mac_b) = (mac(&t.ns_a, &t.veth.a), mac(&t.ns_b, &t.veth.b));
    {
        let _in_a = t.ns_a.enter().expect("enter netns A");
        let mut tx = PcapIo::open(PcapConfig::new(t.veth.a.as_str(), 40001)).unwrap();
        let payload = vec![0x3cu8; 1500 - 40];
        for _ in 0..BURST {
            tx.send_with(1514, &mut |buf: &mut [u8]| {
                build_frame(buf, mac_a, mac_b, t.ip_a, t.ip_b, 40001, PORT, &payload)
            })
            .unwrap();
        }
        tx.flush().unwrap();
        assert_eq!(tx.stats().tx_errors, 0);
    }
    go_tx.send(()).unwrap();
    let (frames, drops) = rx.join().expect("receiver thread").expect("receiver netns");
    assert_eq!(
        (frames, drops),
        (u64::from(BURST), 0),
        "frames received / dropped by the kernel from a {BURST}-frame burst into the default buffer"
    );
}
