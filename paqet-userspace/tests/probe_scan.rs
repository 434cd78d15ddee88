//! An active prober against an XDP-mode server with the guard tag (docs/security.md): recorded client
//! datagrams replayed from another address, flipped bytes and garbage, and port scans (SYN, ACK, FIN,
//! NULL, Xmas, payloads).
//!
//! - `guard_bind = "4tuple"`, `io.probe_response = "closed"`: replays from another address fail the tag in
//!   the XDP program (its `guard_dropped` counter; the workers' guard and replay counters stay 0: nothing
//!   reached userspace), and every scan of the tunnel port is answered exactly like a scan of a closed
//!   port of the same host, byte for byte (the kernel's RST from another port, captured at the same
//!   place; only the port and the TCP checksum differ).
//! - `guard_bind = "port"`, `io.probe_response = "silent"`: a replay from another address passes the tag
//!   (NAT-proof binding) and the replay filter keeps the server silent; scans get no answer at all.
//! - Over IPv6 (default guard and `closed`): the scans' answers match the kernel's closed-port answers
//!   byte for byte but the ports, the TCP checksum and the flow label (a keyed hash in both).
//!
//! Root only (network namespaces, AF_PACKET sockets); every packet stays in the test's own namespaces.
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::{self, answers_to, mutated, record, scans, Probe, Sniffer, PACKET_OUTGOING};
use common::*;

/// The replaying prober's address (nothing configures it: frames are injected raw).
const PROBER: Ipv4Addr = Ipv4Addr::new(10, 216, 0, 77);
/// A port of the server that nothing listens on: the kernel's closed-port answers come from it.
const CLOSED_PORT: u16 = 9990;

/// `series` in the server's metrics (0 when absent).
fn metric(t: &Tunnel, series: &str) -> f64 {
    series_sum(&scrape(t.net.server()), series)
}

fn xdp(t: &Tunnel, counter: &str) -> f64 {
    metric(
        t,
        &format!("paqet_xdp_packets_total{{counter=\"{counter}\"}}"),
    )
}

/// Waits (metrics are published periodically) until `f` holds; the last value.
fn wait_metric(
    t: &Tunnel,
    what: &str,
    f: impl Fn(f64) -> bool,
    get: impl Fn(&Tunnel) -> f64,
) -> f64 {
    let mut last = get(t);
    let ok = poll(Duration::from_secs(6), || {
        last = get(t);
        f(last).then_some(())
    });
    assert!(ok.is_some(), "{what}: last value {last}");
    last
}

/// The tunnel with `guard_bind = bind` on both ends and `io.probe_response = response` on the XDP server
/// (generic XDP: `XDP_TX` on a native veth needs NAPI on the peer, which a pcap client's veth has not).
/// The sniffer on the client's interface starts before the daemons: it records the session's start.
fn tunnel(tag: &str, bind: &str, response: &str) -> (Tunnel, Sniffer) {
    let mut opts = Opts::new((Mode::XdpGeneric, Mode::Pcap));
    opts.conn = 1;
    let o = opts.clone();
    let (bind, response) = (bind.to_owned(), response.to_owned());
    let sniffer: Arc<Mutex<Option<Sniffer>>> = Arc::default();
    let sn = sniffer.clone();
    let hook = move |net: &Net, http: &HttpServer, udp: &UdpEcho, dir: &std::path::Path| {
        *sn.lock().unwrap() = Some(Sniffer::start(net.client(), &net.client_if));
        let kcp = format!("[transport.kcp]\nguard_format = \"tag\"\nguard_bind = \"{bind}\"\n");
        let server = Tunnel::server_config(net, &o).replace(
            "[transport.kcp]\n",
            &format!(
                "{kcp}replay_filter = \"{}\"\n",
                dir.join("replay.bin").display()
            ),
        ) + &format!("[io]\nprobe_response = \"{response}\"\n");
        let client = Tunnel::client_config(net, &o, http, udp, ClientPorts::MAIN, KEY)
            .replace("[transport.kcp]\n", &kcp);
        (server, client)
    };
    let t = Tunnel::start_with(tag, opts, Some(&hook));
    let s = sniffer.lock().unwrap().take().expect("sniffer started");
    (t, s)
}

/// Sends every scan to the tunnel port and to [`CLOSED_PORT`] from the client's address (fresh source
/// ports from `base`) and returns, per scan, the answers from each: (name, tunnel answer, closed answer).
#[allow(clippy::type_complexity)]
fn scan(t: &Tunnel, base: u16) -> Vec<(&'static str, Option<Vec<u8>>, Option<Vec<u8>>)> {
    let net = &t.net;
    let sniff = Sniffer::start(net.client(), &net.client_if);
    let mut frames = Vec::new();
    let all = scans();
    for (i, sc) in all.iter().enumerate() {
        for (j, port) in [TUNNEL_PORT, CLOSED_PORT].into_iter().enumerate() {
            frames.push(raw::build4(&Probe {
                src_mac: raw::mac(&net.server_gw_mac),
                dst_mac: raw::mac(&net.client_gw_mac),
                src: SocketAddr::from((net.client_ip, base + 2 * i as u16 + j as u16)),
                dst: SocketAddr::from((net.server_ip, port)),
                seq: 0x1000_0000 + 7919 * i as u32,
                ack: 0x2000_0000 + 104_729 * i as u32,
                flags: sc.flags,
                tos: 0x2a, // DSCP 10 with ECN bits: the answer reflects the DSCP only
                options: sc.options.clone(),
                payload: sc.payload.clone(),
            }));
        }
    }
    raw::inject(
        net.client(),
        &net.client_if,
        frames,
        Duration::from_millis(5),
    );
    std::thread::sleep(Duration::from_millis(700));
    let got = answers_to(&sniff, net.server_ip, net.client_ip);
    let from = |port: u16| {
        got.iter()
            .find(|f| raw::parse4(f).is_some_and(|p| p.dst.port() == port))
            .cloned()
    };
    all.iter()
        .enumerate()
        .map(|(i, sc)| {
            let p = base + 2 * i as u16;
            (sc.name, from(p), from(p + 1))
        })
        .collect()
}

fn setup(test: &str) -> bool {
    if skip(test, &[]) {
        return false;
    }
    if !paqet::io::steer::has_xdp_program() {
        eprintln!(
            "skipped {test}: this build has no XDP program (bpf-linker missing at build time)"
        );
        return false;
    }
    true
}

#[test]
fn xdp_tunnel_port_drops_bad_tags_and_answers_scans_like_a_closed_port() {
    let test = "xdp_tunnel_port_drops_bad_tags_and_answers_scans_like_a_closed_port";
    if !setup(test) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let (t, sniff) = tunnel("psc4", "4tuple", "closed");
    let recorded = record(&t, sniff);
    let n = recorded.len() as f64;
    let g0 = xdp(&t, "guard_dropped");

    // Replays from another address (the 4-tuple differs: the tag fails in XDP).
    let prober = |port: u16| SocketAddr::from((PROBER, port));
    let replays = recorded
        .iter()
        .map(|f| raw::resourced(f, prober(41000)))
        .collect();
    raw::inject(
        t.net.client(),
        &t.net.client_if,
        replays,
        Duration::from_millis(2),
    );
    // Flipped tag bytes and flipped nonce bytes from the client's own address, garbage from the prober.
    let own = SocketAddr::from((t.net.client_ip, 41001));
    let flipped_tag = mutated(&recorded[..1], own, |p| p[0] ^= 0x01);
    let flipped_head = mutated(&recorded[..1], own, |p| p[8 + 3] ^= 0x80);
    let garbage = mutated(&recorded[..1], prober(41002), |p| p.fill(0x5a));
    let extra = [flipped_tag, flipped_head, garbage].concat();
    raw::inject(
        t.net.client(),
        &t.net.client_if,
        extra,
        Duration::from_millis(2),
    );
    let dropped = wait_metric(
        &t,
        "XDP guard drops of the replays",
        |v| v >= g0 + n + 3.0,
        |t| xdp(t, "guard_dropped"),
    );
    // Nothing of it reached userspace: the workers' own guard check and replay filter saw nothing.
    assert_eq!(
        metric(&t, "paqet_guard_drops_total"),
        0.0,
        "a replay reached userspace"
    );
    assert_eq!(
        metric(&t, "paqet_session_errors_total{reason=\"replay\"}"),
        0.0,
        "a replay reached the replay filter"
    );
    assert!(
        t.probe(ClientPorts::MAIN.fwd_http).is_ok(),
        "live session unharmed"
    );

    // Scans: the tunnel port answers exactly like a closed port.
    let answered0 = xdp(&t, "probe_answered");
    let results = scan(&t, 43000);
    let mut answered = 0;
    for (name, ours, kernel) in &results {
        match (ours, kernel) {
            (None, None) => {
                assert_eq!(*name, "RST", "{name}: neither port answered");
            }
            (Some(a), Some(k)) => {
                answered += 1;
                assert_eq!(
                    a.len(),
                    k.len(),
                    "{name}: lengths\nours   {a:02x?}\nkernel {k:02x?}"
                );
                let pa = raw::parse4(a).unwrap();
                assert_eq!(pa.src.port(), TUNNEL_PORT);
                assert_eq!(
                    raw::tcp4_csum(a),
                    u16::from_be_bytes([a[50], a[51]]),
                    "{name}: TCP checksum"
                );
                assert_eq!(
                    raw::ip4_csum(a),
                    u16::from_be_bytes([a[24], a[25]]),
                    "{name}: IP checksum"
                );
                // Every byte but the ports (different probes) and the TCP checksum that covers them.
                let differ = raw::differing_bytes4(a, k).expect("same length");
                assert!(
                    differ.is_empty(),
                    "{name}: bytes {differ:?} differ from the kernel's closed-port answer\nours   {a:02x?}\nkernel {k:02x?}"
                );
            }
            _ => panic!("{name}: tunnel port answer {ours:02x?}, closed port answer {kernel:02x?}"),
        }
    }
    assert_eq!(answered, results.len() - 1, "every scan but RST answered");
    let a = wait_metric(
        &t,
        "probe_answered",
        |v| v >= answered0 + answered as f64,
        |t| xdp(t, "probe_answered"),
    );
    assert!(
        t.probe(ClientPorts::MAIN.fwd_http).is_ok(),
        "live session unharmed by the scans"
    );
    eprintln!(
        "probe_scan 4tuple/closed: {} replays and 3 mutations dropped in XDP (guard_dropped {dropped}), {answered} scans answered like a closed port (probe_answered {a}), {:.1} s",
        recorded.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn port_bind_replays_meet_the_replay_filter_and_silent_mode_answers_nothing() {
    let test = "port_bind_replays_meet_the_replay_filter_and_silent_mode_answers_nothing";
    if !setup(test) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let (t, sniff) = tunnel("pscp", "port", "silent");
    let recorded = record(&t, sniff);
    let g0 = xdp(&t, "guard_dropped");
    let sniff = Sniffer::start(t.net.client(), &t.net.client_if);
    // The first datagram of the session replayed from another address: the port binding holds, so it
    // passes the tag and reaches the replay filter, which refuses it.
    let first = raw::resourced(&recorded[0], SocketAddr::from((PROBER, 41100)));
    raw::inject(
        t.net.client(),
        &t.net.client_if,
        vec![first],
        Duration::ZERO,
    );
    wait_metric(
        &t,
        "replay refused",
        |v| v >= 1.0,
        |t| metric(t, "paqet_session_errors_total{reason=\"replay\"}"),
    );
    assert_eq!(
        xdp(&t, "guard_dropped"),
        g0,
        "the port-bound tag failed for another address"
    );
    // Scans: no answer from the tunnel port (the closed port still answers: the kernel's).
    let empty0 = xdp(&t, "empty");
    let results = scan(&t, 44000);
    for (name, ours, kernel) in &results {
        assert!(
            ours.is_none(),
            "{name}: the tunnel port answered: {ours:02x?}"
        );
        assert_eq!(
            kernel.is_some(),
            *name != "RST",
            "{name}: the closed port's answer"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let to_prober = answers_to(&sniff, t.net.server_ip, PROBER);
    assert!(
        to_prober.is_empty(),
        "the server answered the replay: {to_prober:02x?}"
    );
    // SYN, SYN|payload… : the payload-less scans count as `empty`, none as answered.
    let bare = scans().iter().filter(|s| s.payload.is_empty()).count() as f64;
    wait_metric(
        &t,
        "empty frames dropped",
        |v| v >= empty0 + bare,
        |t| xdp(t, "empty"),
    );
    assert_eq!(xdp(&t, "probe_answered"), 0.0);
    assert!(
        t.probe(ClientPorts::MAIN.fwd_http).is_ok(),
        "live session unharmed"
    );
    eprintln!(
        "probe_scan port/silent: replay refused by the filter, {} scans unanswered, {:.1} s",
        results.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn xdp_tunnel_port_answers_ipv6_scans_like_a_closed_port() {
    let test = "xdp_tunnel_port_answers_ipv6_scans_like_a_closed_port";
    if !setup(test) || skip(test, &["ip6tables"]) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let mut opts = Opts::new((Mode::XdpGeneric, Mode::Pcap));
    opts.conn = 1;
    let t6 = v6::start("psc6", opts, v6::Plan::V6);
    let net = &t6.t.net;
    let sniff = Sniffer::start(net.client(), &net.client_if);
    let all = scans();
    let base = 45000u16;
    let mut frames = Vec::new();
    for (i, sc) in all.iter().enumerate() {
        for (j, port) in [TUNNEL_PORT, CLOSED_PORT].into_iter().enumerate() {
            frames.push(raw::build6(&Probe {
                src_mac: raw::mac(&net.server_gw_mac),
                dst_mac: raw::mac(&net.client_gw_mac),
                src: SocketAddr::from((v6::CLIENT_IP6, base + 2 * i as u16 + j as u16)),
                dst: SocketAddr::from((v6::SERVER_IP6, port)),
                seq: 0x3000_0000 + 7919 * i as u32,
                ack: 0x4000_0000 + 104_729 * i as u32,
                flags: sc.flags,
                tos: 0x2a,
                options: sc.options.clone(),
                payload: sc.payload.clone(),
            }));
        }
    }
    raw::inject(
        net.client(),
        &net.client_if,
        frames,
        Duration::from_millis(5),
    );
    std::thread::sleep(Duration::from_millis(700));
    let got: Vec<Vec<u8>> = sniff
        .frames()
        .into_iter()
        .filter(|(kind, f)| {
            *kind != PACKET_OUTGOING
                && raw::parse6(f).is_some_and(|(src, dst, _)| {
                    src.ip() == v6::SERVER_IP6 && dst.ip() == v6::CLIENT_IP6 && dst.port() >= base
                })
        })
        .map(|(_, f)| f)
        .collect();
    let from = |port: u16| {
        got.iter()
            .find(|f| raw::parse6(f).is_some_and(|(_, dst, _)| dst.port() == port))
            .cloned()
    };
    let mut answered = 0;
    for (i, sc) in all.iter().enumerate() {
        let name = sc.name;
        let p = base + 2 * i as u16;
        match (from(p), from(p + 1)) {
            (None, None) => assert_eq!(name, "RST", "{name}: neither port answered"),
            (Some(a), Some(k)) => {
                answered += 1;
                assert_eq!(
                    a.len(),
                    k.len(),
                    "{name}: lengths\nours   {a:02x?}\nkernel {k:02x?}"
                );
                assert_eq!(
                    raw::tcp6_csum(&a),
                    u16::from_be_bytes([a[70], a[71]]),
                    "{name}: TCP checksum"
                );
                let label = |f: &[u8]| u32::from_be_bytes([0, f[15] & 0x0f, f[16], f[17]]);
                assert_ne!(label(&a), 0, "{name}: flow label");
                // Every byte but the flow label (15 low nibble, 16, 17), the ports and the TCP checksum.
                let differ: Vec<usize> = (0..a.len())
                    .filter(|i| {
                        let skip =
                            (16..18).contains(i) || (54..58).contains(i) || (70..72).contains(i);
                        let byte15 = *i == 15 && (a[15] & 0xf0) == (k[15] & 0xf0);
                        !skip && !byte15 && a[*i] != k[*i]
                    })
                    .collect();
                assert!(
                    differ.is_empty(),
                    "{name}: bytes {differ:?} differ from the kernel's closed-port answer\nours   {a:02x?}\nkernel {k:02x?}"
                );
            }
            (a, k) => panic!("{name}: tunnel port answer {a:02x?}, closed port answer {k:02x?}"),
        }
    }
    assert_eq!(answered, all.len() - 1, "every scan but RST answered");
    eprintln!(
        "probe_scan ipv6: {answered} scans answered like a closed port, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
