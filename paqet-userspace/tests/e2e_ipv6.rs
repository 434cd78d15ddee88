//! IPv6 end to end through the real `paqet-dp` binary (root only; skipped otherwise).
//!
//! A client and a server namespace joined by a veth carrying both families (`common::v6::dual_net`).
//! Each test moves TCP through SOCKS5 CONNECT (a sha256-checked transfer of tens of MiB each way, and
//! requests to an IPv6 literal target) and UDP through SOCKS5 UDP ASSOCIATE (IPv4 and IPv6 targets),
//! through SOCKS5 listeners on `127.0.0.1` and `[::1]`:
//!
//! - pcap mode, both sides IPv6 only, with captures on both veth ends proving every tunnel frame is
//!   IPv6 with upstream's envelope (traffic class 184, flow label 0, next header 6, hop limit 64, valid
//!   TCP checksums) and that neither kernel answers with a RST (the daemons' ip6tables rules); then
//!   `paqet-dp ping` and `paqet-dp dump` over IPv6;
//! - XDP native and XDP generic, both sides IPv6 only, both taking their IPv6 address and `router_mac`
//!   from the kernel (route and neighbour lookups over IPv6, the server's via a link-local default
//!   gateway), then a pcap client beside the XDP one, also over IPv6;
//! - a dual-stack client (both `network.ipv4` and `network.ipv6`) against a dual-stack server: dialing
//!   the server's IPv6 address it uses IPv6, and the same config dialing the IPv4 address uses IPv4, both
//!   clients at once (pcap, and XDP with the second client in pcap mode beside it).
mod common;

use std::net::{Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::v6::{self, Fam, Plan, Tunnel6, WireFrame, CLIENT_IP6, SERVER_IP6};
use common::*;
use paqet::wire::envelope::{ETHERTYPE_IPV4, ETHERTYPE_IPV6};

const MIB: u64 = 1 << 20;
const RST: u8 = 0x04;

/// A few requests through the tunnel: SOCKS5 CONNECT to the IPv4 and the IPv6 HTTP service (through the
/// SOCKS5 listener on `127.0.0.1` and on `[::1]`), SOCKS5 UDP ASSOCIATE to the IPv4 and the IPv6 UDP
/// echo (through both listeners), and a 3000-byte datagram.
fn small_traffic(t6: &Tunnel6, socks: u16) {
    let t = &t6.t;
    let ns = t.net.client();
    let f = fetch(ns, Via::Socks5(socks), &t.url("/ping"), 20);
    assert!(f.ok && f.len == 4, "GET /ping via SOCKS5: {f:?}");
    let f = fetch(ns, Via::Socks5(socks), &t6.url6("/gen/7/100000"), 20);
    assert!(
        f.ok && f.len == 100_000 && f.sha256 == pattern_sha256(7, 100_000),
        "GET from the [::1] target via SOCKS5: {f:?}"
    );
    // The same through the SOCKS5 listener on [::1].
    let mut c = curl_cmd(ns, Via::Socks5(socks), 20);
    c.args(["--socks5-hostname", &format!("[::1]:{socks}")])
        .arg(t6.url6("/gen/8/100000"));
    let f = spawn_fetch(c).join().expect("fetch thread");
    assert!(
        f.ok && f.len == 100_000 && f.sha256 == pattern_sha256(8, 100_000),
        "GET from the [::1] target via the SOCKS5 listener on [::1]: {f:?}"
    );
    let proxies = [
        SocketAddr::from(([127, 0, 0, 1], socks)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, socks)),
    ];
    for proxy in proxies {
        for target in [t.udp.addr, t6.v6.udp.addr] {
            let msg = format!("socks5-udp-via-{proxy}-to-{target}").into_bytes();
            let got = v6::socks5_udp_any(ns, proxy, target, &msg, Duration::from_secs(15))
                .unwrap_or_else(|e| panic!("SOCKS5 UDP ASSOCIATE via {proxy} to {target}: {e}"));
            assert_eq!(got, msg, "SOCKS5 UDP reply via {proxy} from {target}");
        }
    }
    let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let got = v6::socks5_udp_any(
        ns,
        proxies[0],
        t6.v6.udp.addr,
        &big,
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("SOCKS5 UDP 3000-byte round trip: {e}"));
    assert_eq!(got, big, "SOCKS5 UDP 3000-byte reply");
}

/// The bulk part: 32 MiB down and 16 MiB up through SOCKS5, sha256-checked.
fn bulk_traffic(t6: &Tunnel6) {
    let t = &t6.t;
    let len = 32 * MIB;
    report(
        "download via socks5h",
        len,
        t.download_checked(t.socks(), 1, len, 45),
    );
    report(
        "upload via socks5h",
        16 * MIB,
        t.upload_checked(t.socks(), 2, 16 * MIB, 45),
    );
    let got = udp_forward_roundtrip(
        t.net.client(),
        ClientPorts::MAIN.fwd_udp,
        b"udp-forward",
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("UDP forward round trip: {e}"));
    assert_eq!(got, b"udp-forward");
}

/// Captures of the tunnel port on both veth ends, started before `f` runs and read after.
fn capture_both(t6: &Tunnel6, tag: &str, f: impl FnOnce()) -> Vec<WireFrame> {
    let t = &t6.t;
    let filter = format!("tcp port {TUNNEL_PORT}");
    let c = Tcpdump::start(
        t.net.client(),
        &t.net.client_if,
        t.dir.path().join(format!("{tag}-client.pcap")),
        &["--immediate-mode"],
        &filter,
    );
    let s = Tcpdump::start(
        t.net.server(),
        &t.net.server_if,
        t.dir.path().join(format!("{tag}-server.pcap")),
        &["--immediate-mode"],
        &filter,
    );
    f();
    // Let the last frames reach the capture files before the captures stop.
    std::thread::sleep(Duration::from_millis(300));
    let mut frames = c.frames();
    frames.extend(s.frames());
    frames
}

/// Asserts what a capture of the tunnel shows: no RST either way, and every frame between `client` and
/// the server's tunnel port carries upstream's envelope for its family. Returns how many such frames
/// went each way (to the server, from the server).
fn check_envelopes(frames: &[WireFrame], client: std::net::IpAddr) -> (usize, usize) {
    for f in frames {
        assert_eq!(
            f.tcp_flags & RST,
            0,
            "a RST on the tunnel port (the kernel answered a tunnel frame): {f:?}"
        );
    }
    let ours = |f: &&WireFrame| f.src.ip() == client || f.dst.ip() == client;
    let mut up = 0;
    let mut down = 0;
    for f in frames.iter().filter(ours) {
        if client.is_ipv6() {
            assert_eq!(f.ethertype, ETHERTYPE_IPV6, "{f:?}");
            let h = f.ip_head;
            assert_eq!(
                h[0], 0x6B,
                "version 6, traffic class 184 (high nibble): {f:?}"
            );
            assert_eq!(
                (h[1], h[2], h[3]),
                (0x80, 0, 0),
                "traffic class 184 (low nibble), flow label 0: {f:?}"
            );
            assert_eq!(
                (h[6], h[7]),
                (6, 64),
                "next header TCP, hop limit 64: {f:?}"
            );
        } else {
            assert_eq!(f.ethertype, ETHERTYPE_IPV4, "{f:?}");
            let h = f.ip_head;
            assert_eq!(
                (h[0], h[1], h[4], h[5], h[6], h[7]),
                (0x45, 0xB8, 0, 0, 0x40, 0),
                "IHL 5, TOS 184, ID 0, DF: {f:?}"
            );
        }
        assert_eq!(f.tcp_flags, 0x18, "flags PA (default local_flag): {f:?}");
        assert!(f.checksum_ok, "TCP checksum: {f:?}");
        if f.dst.port() == TUNNEL_PORT {
            up += 1;
        } else {
            assert_eq!(f.src.port(), TUNNEL_PORT, "{f:?}");
            down += 1;
        }
    }
    (up, down)
}

/// `paqet-dp dump` with the server's config decodes the tunnel's IPv6 frames (with the key: the crypto
/// layer authenticates), while `paqet-dp ping` with the client's config gets its PONGs over IPv6.
fn ping_and_dump(t6: &Tunnel6) {
    let t = &t6.t;
    let cfg = |name: &str| t.dir.path().join(name).to_string_lossy().into_owned();
    let mut dump = t
        .net
        .server()
        .command(&bin())
        .args(["dump", "-c", &cfg("server.toml"), "--count", "6"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn paqet-dp dump");
    // Let dump open its capture before the pings.
    std::thread::sleep(Duration::from_millis(500));
    let ping = t
        .net
        .client()
        .command(&bin())
        .args(["ping", "-c", &cfg("client.toml"), "--count", "3"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run paqet-dp ping");
    let stdout = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && stdout.matches("pong ").count() == 3,
        "paqet-dp ping over IPv6: {}\n{stdout}\n{}",
        ping.status,
        String::from_utf8_lossy(&ping.stderr)
    );
    // Six frames come within a few seconds (the pings, the daemons' keepalives): bounded wait.
    let deadline = Instant::now() + Duration::from_secs(15);
    while dump.try_wait().expect("wait dump").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = dump.kill();
    let out = dump.wait_with_output().expect("dump output");
    let text = String::from_utf8_lossy(&out.stdout);
    let from_client = format!("[{CLIENT_IP6}]:");
    assert!(
        text.lines()
            .any(|l| l.contains(&from_client)
                && l.contains(&format!("[{SERVER_IP6}]:{TUNNEL_PORT}"))),
        "paqet-dp dump shows no frame between {CLIENT_IP6} and {SERVER_IP6}:\n{text}"
    );
    assert!(
        text.contains("crypto aes: crc ok") && !text.contains("crypto check failed"),
        "paqet-dp dump did not authenticate every frame:\n{text}"
    );
}

#[test]
fn pcap_ipv6_tcp_and_udp() {
    if skip(
        "pcap_ipv6_tcp_and_udp",
        &["curl", "ip6tables", "ethtool", "tcpdump"],
    ) {
        return;
    }
    let _serial = serial();
    // Guard off: the wire is exactly upstream's (and `dump` decodes it).
    let plan = Plan {
        guard: false,
        ..Plan::V6
    };
    let t6 = v6::start("p6", Opts::new((Mode::Pcap, Mode::Pcap)), plan);
    let frames = capture_both(&t6, "p6", || small_traffic(&t6, ClientPorts::MAIN.socks));
    let (up, down) = check_envelopes(&frames, CLIENT_IP6.into());
    assert!(
        up > 0 && down > 0,
        "IPv6 tunnel frames each way: {up} to the server, {down} from it"
    );
    assert!(
        frames.iter().all(|f| f.ethertype == ETHERTYPE_IPV6),
        "an IPv4 frame on the tunnel port of an IPv6-only tunnel: {:?}",
        frames.iter().find(|f| f.ethertype != ETHERTYPE_IPV6)
    );
    // The daemons installed the ip6tables rules (and removed nothing of the IPv4 ones they do not need).
    for ns in [t6.t.net.client(), t6.t.net.server()] {
        let rules = ns.exec(&["ip6tables-save"]).expect("ip6tables-save");
        assert!(
            rules.contains("paqet-dp"),
            "no paqet-dp ip6tables rule in {}:\n{rules}",
            ns.name()
        );
    }
    bulk_traffic(&t6);
    ping_and_dump(&t6);
    let mut t6 = t6;
    t6.t.server.assert_running();
    t6.t.client.assert_running();
}

/// Both sides IPv6 only in `mode`; both take their IPv6 address and `router_mac` from the kernel (the
/// client from its on-link route to the server, the server from its default route via a link-local
/// gateway).
fn xdp_ipv6(test: &str, tag: &str, mode: Mode) {
    if skip(test, &["curl", "ethtool", "ip6tables"]) {
        return;
    }
    let _serial = serial();
    let plan = Plan {
        client_v6_from_kernel: true,
        server_v6_from_kernel: true,
        ..Plan::V6
    };
    let t6 = v6::start(tag, Opts::new((mode, mode)), plan);
    small_traffic(&t6, ClientPorts::MAIN.socks);
    bulk_traffic(&t6);
    let steered = "paqet_xdp_packets_total{counter=\"steered\"}";
    for ns in [t6.t.net.client(), t6.t.net.server()] {
        let text = wait_metric(ns, Duration::from_secs(5), |t| {
            series_sum(t, steered) > 1000.0
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: the XDP program steered (almost) nothing:\n{}",
                ns.name(),
                scrape(ns)
            )
        });
        assert_eq!(
            series_sum(&text, "paqet_xdp_packets_total{counter=\"malformed\"}"),
            0.0,
            "{}: malformed frames",
            ns.name()
        );
    }
    // The kernel lookups picked the global address (not a link-local one).
    let log = t6.t.client.log_text();
    assert!(
        log.contains(&format!("local=[{CLIENT_IP6}]:")),
        "the client's sessions do not come from {CLIENT_IP6}:\n{log}"
    );
    // A pcap client on the same interface, also over IPv6: the XDP client passes the server's frames to
    // other ports to the kernel, and the XDP server serves a pcap peer.
    let mut second = t6.spawn_client("client-pcap", Plan::V6, ClientPorts::SECOND, mode.beside());
    let t = &t6.t;
    let up = poll(READY_WITHIN, || {
        second.assert_running();
        t.probe(ClientPorts::SECOND.fwd_http).ok()
    });
    assert!(
        up.is_some(),
        "the pcap client beside the XDP one never carried a request: {:?}",
        t.probe(ClientPorts::SECOND.fwd_http)
    );
    small_traffic(&t6, ClientPorts::SECOND.socks);
    t.download_checked(Via::Socks5(ClientPorts::SECOND.socks), 9, 8 * MIB, 30);
    drop(second);
    let mut t6 = t6;
    t6.t.server.assert_running();
    t6.t.client.assert_running();
}

#[test]
fn xdp_native_ipv6_tcp_and_udp() {
    xdp_ipv6("xdp_native_ipv6_tcp_and_udp", "xn6", Mode::XdpNative);
}

#[test]
fn xdp_generic_ipv6_tcp_and_udp() {
    xdp_ipv6("xdp_generic_ipv6_tcp_and_udp", "xg6", Mode::XdpGeneric);
}

/// A dual-stack client against a dual-stack server in `modes`: dialing the IPv6 address it tunnels over
/// IPv6; the same config dialing the IPv4 address (a second client, in [`Mode::beside`] mode) tunnels
/// over IPv4; both carry data at once.
fn dual_stack(tag: &str, modes: (Mode, Mode)) {
    let plan6 = Plan {
        server: Fam::Dual,
        client: Fam::Dual,
        dial_v6: true,
        client_v6_from_kernel: true,
        server_v6_from_kernel: false,
        dial_name: None,
        guard: true,
    };
    let plan4 = Plan {
        dial_v6: false,
        ..plan6
    };
    let t6 = v6::start(tag, Opts::new(modes), plan6);
    let mut second = t6.spawn_client("client-v4", plan4, ClientPorts::SECOND, modes.1.beside());
    let t = &t6.t;
    let up = poll(READY_WITHIN, || {
        second.assert_running();
        t.probe(ClientPorts::SECOND.fwd_http).ok()
    });
    assert!(
        up.is_some(),
        "the dual-stack client dialing IPv4 never carried a request: {:?}",
        t.probe(ClientPorts::SECOND.fwd_http)
    );
    let pcap_both = modes == (Mode::Pcap, Mode::Pcap);
    let traffic = || {
        small_traffic(&t6, ClientPorts::MAIN.socks);
        small_traffic(&t6, ClientPorts::SECOND.socks);
    };
    if pcap_both {
        // Captures see every frame only when no XDP program takes them first.
        let frames = capture_both(&t6, tag, traffic);
        let (up6, down6) = check_envelopes(&frames, CLIENT_IP6.into());
        let (up4, down4) = check_envelopes(&frames, t.net.client_ip.into());
        assert!(
            up6 > 0 && down6 > 0 && up4 > 0 && down4 > 0,
            "frames each way: IPv6 {up6}/{down6}, IPv4 {up4}/{down4}"
        );
        // Each client used only the family of the address it dialed.
        let dialed = |f: &WireFrame, server: SocketAddr| f.dst == server || f.src == server;
        let s6 = SocketAddr::from((SERVER_IP6, TUNNEL_PORT));
        let s4 = t.net.server_addr();
        assert!(frames.iter().all(|f| dialed(f, s6) || dialed(f, s4)));
    } else {
        traffic();
    }
    // Both at once, byte-exact.
    let len = 16 * MIB;
    let jobs: Vec<_> = [
        (ClientPorts::MAIN.socks, 21u64),
        (ClientPorts::SECOND.socks, 22u64),
    ]
    .into_iter()
    .map(|(port, seed)| {
        let mut c = curl_cmd(t.net.client(), Via::Socks5(port), 60);
        c.arg(t.url(&format!("/gen/{seed}/{len}")));
        (port, seed, spawn_fetch(c))
    })
    .collect();
    for (port, seed, j) in jobs {
        let f = j.join().expect("fetch thread");
        assert!(
            f.ok && f.len == len && f.sha256 == pattern_sha256(seed, len),
            "download through the client on SOCKS5 port {port}: {f:?}"
        );
    }
    t.upload_checked(t.socks(), 23, 8 * MIB, 45);
    second.assert_running();
    drop(second);
    let mut t6 = t6;
    t6.t.server.assert_running();
    t6.t.client.assert_running();
}

#[test]
fn dual_stack_client_pcap() {
    if skip(
        "dual_stack_client_pcap",
        &["curl", "iptables", "ip6tables", "ethtool", "tcpdump"],
    ) {
        return;
    }
    let _serial = serial();
    dual_stack("dsp", (Mode::Pcap, Mode::Pcap));
}

#[test]
fn dual_stack_client_xdp() {
    if skip(
        "dual_stack_client_xdp",
        &["curl", "iptables", "ip6tables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    dual_stack("dsx", (Mode::XdpNative, Mode::XdpNative));
}

/// `server.addr` as a host name with both an IPv4 and an IPv6 address (IPv6 listed first): a client
/// configured for one family dials that family's address, a dual-stack client dials IPv4 (upstream
/// resolves names preferring IPv4).
#[test]
fn server_host_name_picks_a_configured_family() {
    if skip(
        "server_host_name_picks_a_configured_family",
        &["curl", "iptables", "ip6tables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    let name = Some("paqet-test-server");
    let only4 = Plan {
        server: Fam::Dual,
        client: Fam::V4,
        dial_v6: false,
        client_v6_from_kernel: false,
        server_v6_from_kernel: false,
        dial_name: name,
        guard: true,
    };
    let t6 = v6::start("hn", Opts::new((Mode::Pcap, Mode::Pcap)), only4);
    let t = &t6.t;
    let third = ClientPorts {
        socks: 1082,
        http: 8120,
        fwd_http: 18100,
        fwd_udp: 18073,
        metrics: 9102,
    };
    let mut only6 = t6.spawn_client(
        "client-v6-only",
        Plan {
            client: Fam::V6,
            ..only4
        },
        ClientPorts::SECOND,
        Mode::Pcap,
    );
    let mut dual = t6.spawn_client(
        "client-dual",
        Plan {
            client: Fam::Dual,
            ..only4
        },
        third,
        Mode::Pcap,
    );
    for (d, ports) in [(&mut only6, ClientPorts::SECOND), (&mut dual, third)] {
        let up = poll(READY_WITHIN, || {
            d.assert_running();
            t.probe(ports.fwd_http).ok()
        });
        assert!(
            up.is_some(),
            "{} never carried a request: {:?}\n{}",
            d.name,
            t.probe(ports.fwd_http),
            d.log_text()
        );
        t.download_checked(Via::Socks5(ports.socks), 31, 4 * MIB, 30);
    }
    t.download_checked(t.socks(), 32, 4 * MIB, 30);
    let s4 = format!("server={}", t.net.server_addr());
    let s6 = format!("server=[{SERVER_IP6}]:{TUNNEL_PORT}");
    for (log, want, what) in [
        (t.client.log_text(), &s4, "the IPv4-only client"),
        (only6.log_text(), &s6, "the IPv6-only client"),
        (dual.log_text(), &s4, "the dual-stack client"),
    ] {
        assert!(
            log.contains(want.as_str()),
            "{what} did not dial {want}:\n{log}"
        );
    }
}
