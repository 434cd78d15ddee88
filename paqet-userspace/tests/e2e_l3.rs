//! paqet on interfaces without a link header (root only; skipped otherwise).
//!
//! The client and server namespaces are joined by a tun pair and a relay of this process
//! ([`common::tunlink`]): frames start at the IP header, no MACs, no `router_mac` — what a WireGuard, ppp
//! or tun interface looks like. Over it, the real `paqet-dp` binary runs every daemon e2e in pcap mode and
//! in generic XDP mode: SOCKS5 TCP and UDP (and a UDP forward), a 200 MiB sha256-checked transfer, and
//! recovery after a server restart. The relay's counters prove the traffic crossed the tun link.
//!
//! Below the daemon: the pcap backend on a tun (DLT_RAW) and on a ppp-typed tun (libpcap's cooked
//! LINUX_SLL mode) receives and injects bare IP packets (IPv4 and IPv6), an unsupported datalink is a clear
//! error naming the interface and the datalink (and `doctor`'s `nic.medium` says so), a `router_mac`
//! configured for an L3 interface is refused at start naming the key and the medium, XDP `auto` attaches in
//! generic mode on a tun, and `paqet-dp dump` decodes a live tunnel on a tun.
mod common;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::tunlink::{open_tun, read_packet, write_packet};
use common::*;
use paqet::doctor::{self, DoctorOptions, Finding, Status};
use paqet::io::pcap::{Datalink, PcapConfig, PcapIo, PcapIoError, TxMethod};
use paqet::io::route::{self, RouteError};
use paqet::io::PacketIo;
use paqet::wire::envelope::{parse_frame_on, EnvelopeBuilder, Medium, TcpFlags};
use paqet_testkit::netns::Netns;

const MIB: u64 = 1 << 20;
/// The data-path modes every daemon test runs with over the tun link (server, client).
const L3_MODES: &[(Mode, Mode)] = &[
    (Mode::Pcap, Mode::Pcap),
    (Mode::XdpGeneric, Mode::XdpGeneric),
];

/// The modes this build can run, or `None` (after saying why) when `test` must be skipped.
fn modes(test: &str) -> Option<Vec<(Mode, Mode)>> {
    if skip(test, &["curl", "iptables"]) {
        return None;
    }
    let xdp = paqet::io::steer::has_xdp_program();
    if !xdp {
        if std::env::var("PAQET_REQUIRE_XDP").as_deref() == Ok("1") {
            panic!("{test}: PAQET_REQUIRE_XDP=1 but this build has no XDP program");
        }
        eprintln!("{test}: this build has no XDP program; running the pcap mode only");
    }
    Some(
        L3_MODES
            .iter()
            .copied()
            .filter(|(s, _)| xdp || *s == Mode::Pcap)
            .collect(),
    )
}

/// A tunnel over a tun pair in `modes`.
fn l3_tunnel(tag: &str, modes: (Mode, Mode)) -> Tunnel {
    let mut o = Opts::new(modes);
    o.tun = true;
    Tunnel::start(tag, o)
}

/// Asserts the relay moved at least `min` packets (client → server, server → client) since `before`.
fn assert_relayed(t: &Tunnel, before: (u64, u64), min: (u64, u64), what: &str) {
    let (c2s, s2c) = t.net.tun_relay().expect("a tun link").moved();
    eprintln!(
        "{what}: the tun relay moved {} packets client→server, {} server→client",
        c2s - before.0,
        s2c - before.1
    );
    assert!(
        c2s - before.0 >= min.0 && s2c - before.1 >= min.1,
        "{what}: the tun relay moved {} / {} packets (client→server / server→client), want ≥ {min:?}",
        c2s - before.0,
        s2c - before.1
    );
}

/// Asserts both XDP daemons' programs steered at least `min` frames parsed from the IP header.
fn assert_steered(t: &Tunnel, min: u64) {
    const STEERED: &str = "paqet_xdp_packets_total{counter=\"steered\"}";
    for (side, ns) in [("server", t.net.server()), ("client", t.net.client())] {
        let got = wait_metric(ns, Duration::from_secs(10), |s| {
            series_sum(s, STEERED) >= min as f64
        });
        if let Some(text) = &got {
            eprintln!("{side}: XDP steered {} frames", series_sum(text, STEERED));
        }
        assert!(
            got.is_some(),
            "{side}: the XDP program steered fewer than {min} frames on the tun:\n{}",
            scrape(ns)
                .lines()
                .filter(|l| l.starts_with("paqet_xdp"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn l3_socks5_tcp_and_udp() {
    let Some(modes) = modes("l3_socks5_tcp_and_udp") else {
        return;
    };
    let _serial = serial();
    for m in modes {
        eprintln!("== modes {m:?}");
        let t = l3_tunnel("l3s", m);
        let before = t.net.tun_relay().unwrap().moved();
        let ns = t.net.client();
        let f = fetch(ns, t.socks(), &t.url("/ping"), 20);
        assert!(f.ok && f.len == 4, "GET /ping via SOCKS5 over tun: {f:?}");
        t.download_checked(t.socks(), 11, 8 * MIB, 60);
        t.upload_checked(t.http_proxy(), 12, 8 * MIB, 60);
        for i in 0..3u32 {
            let msg = format!("l3-socks5-udp-{i}").into_bytes();
            let got = socks5_udp_roundtrip(
                ns,
                ClientPorts::MAIN.socks,
                t.udp.addr,
                &msg,
                Duration::from_secs(15),
            )
            .unwrap_or_else(|e| panic!("SOCKS5 UDP over tun {i}: {e}"));
            assert_eq!(got, msg, "SOCKS5 UDP reply {i}");
        }
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
        let got = socks5_udp_roundtrip(
            ns,
            ClientPorts::MAIN.socks,
            t.udp.addr,
            &big,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("SOCKS5 UDP 3000 bytes over tun: {e}"));
        assert_eq!(got, big);
        let got = udp_forward_roundtrip(
            ns,
            ClientPorts::MAIN.fwd_udp,
            b"l3-forward",
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("UDP forward over tun: {e}"));
        assert_eq!(got, b"l3-forward");
        // 8 MiB each way is thousands of packets in both directions.
        assert_relayed(&t, before, (1000, 1000), "SOCKS5 TCP + UDP");
        if m.0 == Mode::XdpGeneric {
            assert_steered(&t, 1000);
        }
        let mut t = t;
        t.server.assert_running();
        t.client.assert_running();
    }
}

#[test]
fn l3_transfer_200mib_sha256() {
    let Some(modes) = modes("l3_transfer_200mib_sha256") else {
        return;
    };
    let _serial = serial();
    for m in modes {
        eprintln!("== modes {m:?}");
        let t = l3_tunnel("l3t", m);
        let before = t.net.tun_relay().unwrap().moved();
        let len = 200 * MIB;
        report(
            &format!("{m:?} over tun: download via socks5h"),
            len,
            t.download_checked(t.socks(), 21, len, 300),
        );
        // 200 MiB in ≤ 1500-byte frames is > 140 000 packets towards the client.
        let (_, s2c) = t.net.tun_relay().unwrap().moved();
        assert!(
            s2c - before.1 > 140_000,
            "only {} packets crossed the tun link towards the client",
            s2c - before.1
        );
        let mut t = t;
        t.server.assert_running();
        t.client.assert_running();
    }
}

#[test]
fn l3_restart_recovery() {
    let Some(modes) = modes("l3_restart_recovery") else {
        return;
    };
    let _serial = serial();
    for m in modes {
        eprintln!("== modes {m:?}");
        let mut t = l3_tunnel("l3r", m);
        t.download_checked(t.socks(), 31, 4 * MIB, 60);
        t.restart_server("server-restarted");
        let t0 = Instant::now();
        let back = poll(Duration::from_secs(60), || {
            t.probe(ClientPorts::MAIN.fwd_http).ok()
        });
        assert!(
            back.is_some(),
            "no request went through within 60 s of the server restart over tun:\n{}",
            t.server.log_text()
        );
        eprintln!(
            "client recovered {:.1} s after the restart",
            t0.elapsed().as_secs_f64()
        );
        let before = t.net.tun_relay().unwrap().moved();
        t.download_checked(t.socks(), 32, 16 * MIB, 60);
        t.download_checked(t.http_proxy(), 33, 16 * MIB, 60);
        // 32 MiB down: > 20 000 data packets towards the client, acknowledgements the other way.
        assert_relayed(&t, before, (100, 20_000), "after the restart");
        t.client.assert_running();
        t.server.assert_running();
    }
}

/// A `router_mac` configured for an L3 interface is refused at start, naming the key and the medium; the
/// same config without it runs.
#[test]
fn l3_router_mac_is_refused() {
    if skip("l3_router_mac_is_refused", &[]) {
        return;
    }
    let _serial = serial();
    let net = Net::tun("l3m");
    let dir = TempDir::new("l3m");
    let cfg = server_toml(&net.server_if, net.server_ip, "02:00:00:00:00:01");
    let mut d = Daemon::spawn(
        net.server(),
        dir.path(),
        "server-mac",
        &cfg,
        Mode::Pcap,
        false,
    );
    let exited = poll(Duration::from_secs(15), || (!d.running()).then_some(()));
    let log = d.log_text();
    assert!(
        exited.is_some(),
        "the daemon kept running with router_mac on a tun:\n{log}"
    );
    assert!(
        log.contains("network.ipv4.router_mac is set")
            && log.contains(&format!("interface \"{}\" has medium ip", net.server_if))
            && log.contains("remove network.ipv4.router_mac"),
        "the refusal does not name the key and the medium:\n{log}"
    );
    // Without router_mac the same daemon starts (and keeps running).
    let cfg = server_toml(&net.server_if, net.server_ip, "");
    let mut d = Daemon::spawn(
        net.server(),
        dir.path(),
        "server-ok",
        &cfg,
        Mode::Pcap,
        false,
    );
    std::thread::sleep(Duration::from_secs(2));
    d.assert_running();
}

fn server_toml(iface: &str, ip: std::net::Ipv4Addr, mac: &str) -> String {
    format!(
        "role = \"server\"\n[log]\nlevel = \"info\"\n[listen]\naddr = \":{TUNNEL_PORT}\"\n[network]\n\
         interface = \"{iface}\"\n[network.ipv4]\naddr = \"{ip}:{TUNNEL_PORT}\"\n{}\n[transport]\n\
         protocol = \"kcp\"\n[transport.kcp]\nkey = \"{KEY}\"\n",
        router_mac_line(mac)
    )
}

// ---------------------------------------------------------------------------------------------------------
// The pcap backend on L3 devices
// ---------------------------------------------------------------------------------------------------------

/// A namespace with one tun device (optionally re-typed to `arphrd`) carrying 10.218.0.1/24 and fd18::1/64.
struct OneTun {
    fd: OwnedFd,
    iface: String,
    ns: Netns,
}

impl OneTun {
    fn new(tag: &str, arphrd: Option<u16>) -> OneTun {
        let ns = Netns::new(tag).expect("netns");
        let iface = format!("t{tag}{}", std::process::id());
        let fd = open_tun(&ns, &iface, arphrd).expect("tun device");
        ns.exec(&["ip", "addr", "add", "10.218.0.1/24", "dev", &iface])
            .expect("IPv4 address");
        ns.exec(&["ip", "addr", "add", "fd18::1/64", "dev", &iface, "nodad"])
            .expect("IPv6 address");
        OneTun { fd, iface, ns }
    }
}

const PORT: u16 = 9999;

/// `paqet-dp doctor`'s `nic.medium` finding for the tun of `t`, checked inside its namespace.
fn doctor_medium(t: &OneTun) -> Finding {
    let iface = t.iface.clone();
    in_ns(&t.ns, move || {
        doctor::run(&DoctorOptions {
            iface: Some(iface),
            pcap_sockbuf: None,
        })
        .get("nic.medium")
        .cloned()
    })
    .expect("doctor reports nic.medium")
}

/// RX and TX of bare IP packets (IPv4 and IPv6) through a pcap backend on `t`, for each TX method / batch
/// size in `tx`: a packet written into the tun is what the device receives from its peer; a packet the
/// backend sends comes out of the tun fd unchanged.
fn pcap_moves_bare_ip(t: &OneTun, want: Datalink, tx: &[(TxMethod, usize)]) {
    for &(method, batch) in tx {
        let iface = t.iface.clone();
        let io = in_ns(&t.ns, move || {
            let mut c = PcapConfig::new(iface, PORT);
            c.tx = method;
            c.tx_batch = batch;
            PcapIo::open(c)
        })
        .unwrap_or_else(|e| panic!("pcap on {} ({method:?}): {e}", t.iface));
        let mut io = io;
        assert_eq!(io.datalink(), want, "{}", t.iface);
        assert_eq!(io.medium(), Medium::Ip, "{}", t.iface);
        for (local, peer) in [
            ("10.218.0.1:9999", "10.218.0.2:40000"),
            ("[fd18::1]:9999", "[fd18::2]:40000"),
        ] {
            let local: SocketAddr = local.parse().unwrap();
            let peer: SocketAddr = peer.parse().unwrap();
            // RX: the peer's packet arrives on the device.
            let mut from_peer =
                EnvelopeBuilder::new_on(Medium::Ip, [0; 6], [0; 6], peer, local, 7).unwrap();
            let msg = format!("to {local} over {method:?}");
            let mut pkt = vec![0u8; from_peer.header_len(TcpFlags::PSH_ACK) + msg.len()];
            from_peer
                .emit_with_payload(TcpFlags::PSH_ACK, msg.as_bytes(), &mut pkt)
                .unwrap();
            write_packet(&t.fd, &pkt).expect("write into the tun");
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            while got.is_empty() && Instant::now() < deadline {
                io.recv_batch(Duration::from_millis(100), &mut |f: &[u8]| {
                    got.push(f.to_vec())
                })
                .expect("recv_batch");
            }
            assert_eq!(got.len(), 1, "{}: captured {got:?}", t.iface);
            assert_eq!(
                got[0], pkt,
                "{}: the captured frame is the bare IP packet",
                t.iface
            );
            let p = parse_frame_on(Medium::Ip, &got[0], Some(PORT)).unwrap();
            assert_eq!(p.payload, msg.as_bytes());
            assert_eq!(p.src_addr(), peer);

            // TX: our packet leaves through the device (and comes out of the tun fd) unchanged.
            let mut to_peer =
                EnvelopeBuilder::new_on(Medium::Ip, [0; 6], [0; 6], local, peer, 9).unwrap();
            let reply = b"reply over an L3 device";
            let mut out = vec![0u8; to_peer.header_len(TcpFlags::PSH_ACK) + reply.len()];
            to_peer
                .emit_with_payload(TcpFlags::PSH_ACK, reply, &mut out)
                .unwrap();
            io.send(&out).expect("send");
            io.flush().expect("flush");
            // The tun also carries the kernel's own packets (its RST to the packet above, IPv6 router
            // solicitations): look for ours among them.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut others = Vec::new();
            loop {
                match read_packet(&t.fd, deadline.saturating_duration_since(Instant::now())) {
                    Some(p) if p == out => break,
                    Some(p) => others.push(p),
                    None => panic!(
                        "{}: our packet ({method:?}, to {peer}) never came out of the tun; saw {others:?}",
                        t.iface
                    ),
                }
            }
        }
        assert_eq!(io.stats().tx_errors, 0);
    }
}

#[test]
fn pcap_on_tun_is_raw_ip() {
    if skip("pcap_on_tun_is_raw_ip", &[]) {
        return;
    }
    let t = OneTun::new("l3p", None);
    let info = in_ns(&t.ns, {
        let i = t.iface.clone();
        move || route::link_info(&i)
    })
    .expect("link info");
    assert_eq!(info.arphrd, 65534, "tun is ARPHRD_NONE");
    assert_eq!(info.medium().unwrap(), Medium::Ip);
    let m = doctor_medium(&t);
    assert_eq!(m.current, "ip (ARPHRD 65534 none (tun, wireguard))");
    assert_eq!(m.status, Status::Ok);
    assert!(m.note.unwrap_or_default().contains("router_mac"));
    pcap_moves_bare_ip(
        &t,
        Datalink::Raw,
        &[
            (TxMethod::AfPacket, 1),
            (TxMethod::AfPacket, 32),
            (TxMethod::Pcap, 1),
        ],
    );
}

/// A tun re-typed to ARPHRD_PPP: libpcap opens it in cooked mode (LINUX_SLL); the backend strips the
/// pseudo-header and injects with an explicit IPv4/IPv6 protocol (what a real ppp device needs).
#[test]
fn pcap_on_ppp_strips_the_cooked_header() {
    if skip("pcap_on_ppp_strips_the_cooked_header", &[]) {
        return;
    }
    let t = OneTun::new("l3q", Some(512));
    let m = in_ns(&t.ns, {
        let i = t.iface.clone();
        move || route::link_medium(&i)
    })
    .expect("medium");
    assert_eq!(m, Medium::Ip);
    pcap_moves_bare_ip(
        &t,
        Datalink::Cooked { header: 16 },
        &[(TxMethod::AfPacket, 1), (TxMethod::AfPacket, 32)],
    );
    // libpcap cannot inject in cooked mode: refused at open, not at the first send.
    let iface = t.iface.clone();
    let e = in_ns(&t.ns, move || {
        let mut c = PcapConfig::new(iface, PORT);
        c.tx = TxMethod::Pcap;
        PcapIo::open(c).err()
    })
    .expect("pcap TX on a cooked capture must be refused");
    assert!(e.to_string().contains("cooked"), "{e}");
}

/// A link type that is neither Ethernet nor bare IP (a tun re-typed to ARPHRD_FDDI, 774): the pcap backend
/// and the link lookup both refuse it with the interface and the datalink / link type named.
#[test]
fn unsupported_datalink_is_a_clear_error() {
    if skip("unsupported_datalink_is_a_clear_error", &[]) {
        return;
    }
    let t = OneTun::new("l3u", Some(774));
    let iface = t.iface.clone();
    let (pcap, medium) = in_ns(&t.ns, move || {
        (
            PcapIo::open(PcapConfig::new(iface.clone(), PORT)).err(),
            route::link_medium(&iface).err(),
        )
    });
    let e = pcap.expect("pcap on an FDDI-typed device must fail");
    match &e {
        PcapIoError::UnsupportedDatalink { iface, dlt, name } => {
            assert_eq!(iface, &t.iface);
            assert_eq!(*dlt, 10, "DLT_FDDI");
            assert_eq!(name, "FDDI");
        }
        other => panic!("want UnsupportedDatalink, got {other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "interface \"{}\" has pcap datalink FDDI (10)",
            t.iface
        )),
        "{text}"
    );
    let m = doctor_medium(&t);
    assert_eq!(m.current, "unsupported (ARPHRD 774 unknown)");
    assert_eq!(m.status, Status::Fail);
    let e = medium.expect("link_medium on an FDDI-typed device must fail");
    assert!(
        matches!(&e, RouteError::UnsupportedLinkType { arphrd: 774, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("interface \"{}\" has link type 774", t.iface)),
        "{e}"
    );
}

/// XDP on a tun: `auto` attaches in generic mode (native XDP cannot be attached to a tun in tun mode) and
/// the program is told to parse from the IP header.
#[test]
fn xdp_auto_on_tun_is_generic() {
    if skip("xdp_auto_on_tun_is_generic", &[]) {
        return;
    }
    if !paqet::io::steer::has_xdp_program() {
        eprintln!("skipped xdp_auto_on_tun_is_generic: this build has no XDP program");
        return;
    }
    use paqet::io::steer::{Steering, XdpAttach, XdpMode};
    use paqet_common::SteerConfig;
    let t = OneTun::new("l3x", None);
    let iface = t.iface.clone();
    let (auto, native) = in_ns(&t.ns, move || {
        let auto = Steering::attach_auto(&iface, SteerConfig::any(PORT))
            .map(|(s, a)| (a, s.medium(), s.attached()));
        let native = Steering::attach(&iface, XdpMode::Native, SteerConfig::any(PORT)).err();
        (auto, native)
    });
    let (attach, medium, attached) = auto.expect("auto attach on a tun");
    assert_eq!(attach, XdpAttach::Generic);
    assert_eq!(attached, XdpAttach::Generic);
    assert_eq!(medium, Medium::Ip);
    let e = native.expect("native XDP on a tun");
    eprintln!("native XDP on a tun: {e}");
    assert!(e.to_string().contains("native mode"), "{e}");
}

/// `paqet-dp dump` on the server's tun decodes the bare IP frames of a live tunnel (the capture's datalink
/// sets the medium): tunnel frames in both directions, none described as "not a tunnel frame".
#[test]
fn l3_dump_decodes_bare_ip() {
    if skip("l3_dump_decodes_bare_ip", &["curl", "iptables"]) {
        return;
    }
    let _serial = serial();
    let t = l3_tunnel("l3d", (Mode::Pcap, Mode::Pcap));
    let cfg = t.dir.path().join("server.toml");
    let out = t.dir.path().join("dump.txt");
    let mut child = t
        .net
        .server()
        .command(&bin())
        .args(["dump", "-c"])
        .arg(&cfg)
        .args(["--count", "60"])
        .stdout(std::fs::File::create(&out).expect("dump output"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn paqet-dp dump");
    // Let the capture start, then move data until the dump has its frames (bounded).
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        t.download_checked(t.socks(), 41, MIB, 30);
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let _ = child.wait();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let to = format!("-> {}:{TUNNEL_PORT} (to port)", t.net.server_ip);
    let from = format!("{}:{TUNNEL_PORT} -> ", t.net.server_ip);
    assert!(
        text.lines().filter(|l| l.contains(&to)).count() >= 5
            && text.lines().any(|l| l.contains(&from)),
        "dump on the tun shows no tunnel frames both ways:\n{text}"
    );
    assert!(
        !text.contains("not a tunnel frame"),
        "dump on the tun misread frames:\n{text}"
    );
}
