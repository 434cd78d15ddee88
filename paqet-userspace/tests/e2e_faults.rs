//! Fault tests through the real `paqet-dp` binary (root only; skipped otherwise): an impaired path (20 ms
//! delay, 2 % loss, reordering) with the default congestion control, with `cc = "fixed"` and with
//! `cc = "off"`, the server killed and restarted mid-transfer, a wrong key, a flood of
//! random and truncated packets at the server port from a third party, and the server's session/stream
//! limits.
//!
//! Every test runs for each `(server mode, client mode)` pair of `common::MODES`. Tests that start a second
//! client next to the main one run it in pcap mode when the main client uses XDP (one XDP daemon per
//! interface, see `Tunnel::spawn_client`). Metrics are published every 500 ms, so assertions on them wait
//! (bounded) for the expected value instead of trusting one scrape.
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use paqet::wire::envelope::{EnvelopeBuilder, TcpFlags};
use paqet_testkit::impair::LinkSpec;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn has_nfqueue() -> bool {
    let ok = std::path::Path::new("/proc/net/netfilter/nfnetlink_queue").exists();
    if !ok {
        eprintln!("skipped: kernel has no nfnetlink_queue (needed for the impaired link)");
    }
    ok
}

/// 20 ms ± 5 ms per direction (jitter reorders packets), 2 % loss per direction.
const LOSSY: LinkSpec = LinkSpec {
    delay_ms: 20,
    jitter_ms: 5,
    loss_pct: 2.0,
    dup_pct: 0.0,
    seed: 7,
};

/// Starts a tunnel from the common configs with `kcp_lines` in the `[transport.kcp]` table of both the
/// server (`Opts::server_kcp_extra`) and the client (added to `Tunnel::client_config`'s text).
fn start_with_kcp_lines(tag: &str, mut o: Opts, kcp_lines: &str) -> Tunnel {
    o.server_kcp_extra = format!("{}\n{kcp_lines}", o.server_kcp_extra);
    let opts = o.clone();
    let configs = move |net: &Net, http: &HttpServer, udp: &UdpEcho, _: &Path| {
        let client =
            Tunnel::client_config(net, &opts, http, udp, ClientPorts::MAIN, &opts.client_key);
        let table = "[transport.kcp]\n";
        assert!(
            client.contains(table),
            "client config has no {table:?}:\n{client}"
        );
        (
            Tunnel::server_config(net, &opts),
            client.replacen(table, &format!("{table}{kcp_lines}\n"), 1),
        )
    };
    Tunnel::start_with(tag, o, Some(&configs))
}

#[test]
fn lossy_delayed_reordering_link_carries_200mib_byte_exact() {
    if skip(
        "lossy_delayed_reordering_link_carries_200mib_byte_exact",
        &["curl", "iptables", "ethtool"],
    ) || !has_nfqueue()
    {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut o = Opts::new(modes);
        o.link = Some(LOSSY);
        o.wnd = 2048;
        o.smuxktimeout = 10;
        let t = Tunnel::start("flo", o);
        let len = 200 * MIB;
        report(
            "200 MiB down over the impaired link",
            len,
            t.download_checked(t.socks(), 31, len, 420),
        );
        let mut t = t;
        t.server.assert_running();
        t.client.assert_running();
        let retrans = poll(Duration::from_secs(5), || {
            let s = scrape(t.net.server());
            let c = scrape(t.net.client());
            let r = metric_sum(&s, "paqet_kcp_retransmissions_total")
                + metric_sum(&c, "paqet_kcp_retransmissions_total");
            (r > 0.0).then_some(r)
        });
        match retrans {
            Some(r) => eprintln!("KCP retransmissions over the lossy link: {r}"),
            None => panic!("2 % loss but no KCP retransmission counted"),
        }
    }
}

#[test]
fn lossy_link_with_fixed_rate_cc_carries_data_byte_exact() {
    if skip(
        "lossy_link_with_fixed_rate_cc_carries_data_byte_exact",
        &["curl", "iptables", "ethtool"],
    ) || !has_nfqueue()
    {
        return;
    }
    let _serial = serial();
    // 40 mbit/s = 5 MB/s on the wire per session, well below what the impaired link carries.
    const RATE: u64 = 5_000_000;
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut o = Opts::new(modes);
        o.link = Some(LOSSY);
        let t = start_with_kcp_lines("fcf", o, "cc = \"fixed\"\nbandwidth = \"40mbit\"");
        // One transfer is one stream on one session, paced by its sender at the rate (headers and
        // retransmissions included): it cannot take much less than len / rate.
        let paced = |what: &str, len: u64, took: Duration| {
            report(
                &format!("{what} over the impaired link, cc = fixed 40mbit"),
                len,
                took,
            );
            let floor = Duration::from_secs_f64(0.8 * len as f64 / RATE as f64);
            assert!(
                took >= floor,
                "{what} in {took:?} at a fixed 40 mbit/s (at least {floor:?} expected): not paced"
            );
        };
        // Down: the server's sender; up: the client's.
        paced(
            "8 MiB down",
            8 * MIB,
            t.download_checked(t.socks(), 91, 8 * MIB, 60),
        );
        paced(
            "4 MiB up",
            4 * MIB,
            t.upload_checked(t.http_proxy(), 92, 4 * MIB, 60),
        );
        let mut t = t;
        t.server.assert_running();
        t.client.assert_running();
    }
}

#[test]
fn lossy_link_with_cc_off_carries_data_byte_exact() {
    if skip(
        "lossy_link_with_cc_off_carries_data_byte_exact",
        &["curl", "iptables", "ethtool"],
    ) || !has_nfqueue()
    {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut o = Opts::new(modes);
        o.link = Some(LOSSY);
        let t = start_with_kcp_lines("fco", o, "cc = \"off\"");
        let len = 8 * MIB;
        report(
            "8 MiB down over the impaired link, cc = off",
            len,
            t.download_checked(t.socks(), 93, len, 60),
        );
        report(
            "4 MiB up over the impaired link, cc = off",
            4 * MIB,
            t.upload_checked(t.http_proxy(), 94, 4 * MIB, 60),
        );
        let mut t = t;
        t.server.assert_running();
        t.client.assert_running();
    }
}

#[test]
fn server_killed_mid_transfer_client_recovers() {
    if skip(
        "server_killed_mid_transfer_client_recovers",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut t = Tunnel::start("frs", Opts::new(modes));
        // A long download is running when the server dies.
        let mut c = curl_cmd(t.net.client(), t.socks(), 120);
        c.arg(t.url(&format!("/gen/41/{}", 2048 * MIB)));
        let job = spawn_fetch(c);
        // Wait (bounded) until bytes flow, then kill the server hard.
        let flowing = wait_metric(t.net.server(), Duration::from_secs(20), |s| {
            metric_sum(s, "paqet_bytes_total") > (4 * MIB) as f64
        });
        assert!(flowing.is_some(), "the download never got going");
        t.server.kill();
        let f = job.join().expect("fetch thread");
        assert!(
            !f.ok || f.len < 2048 * MIB,
            "a 2 GiB download cannot have completed across a server kill"
        );
        eprintln!(
            "interrupted download stopped after {} MiB: {}",
            f.len >> 20,
            f.stderr.trim()
        );

        t.restart_server("server-restarted");
        // The client notices (smux keepalive) and re-dials by itself; no help from the test.
        let t0 = Instant::now();
        let back = poll(Duration::from_secs(60), || {
            t.probe(ClientPorts::MAIN.fwd_http).ok()
        });
        assert!(
            back.is_some(),
            "no request went through within 60 s of the server restart"
        );
        eprintln!(
            "client recovered {:.1} s after the restart",
            t0.elapsed().as_secs_f64()
        );
        t.download_checked(t.socks(), 42, 16 * MIB, 60);
        t.download_checked(t.http_proxy(), 43, 16 * MIB, 60);
        t.client.assert_running();
    }
}

#[test]
fn wrong_key_passes_no_data_and_says_why() {
    if skip(
        "wrong_key_passes_no_data_and_says_why",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let t = Tunnel::start("fwk", Opts::new(modes));
        // A second client with another key next to the good one.
        let mut bad = t.spawn_client("client-wrong-key", ClientPorts::SECOND, "not-the-right-key");
        let mut attempts = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            attempts += 1;
            let f = fetch(
                t.net.client(),
                Via::Socks5(ClientPorts::SECOND.socks),
                &t.url("/gen/51/65536"),
                5,
            );
            assert!(
                !(f.ok && f.len > 0),
                "data passed with the wrong key (attempt {attempts}): {f:?}"
            );
            assert!(
                t.probe(ClientPorts::SECOND.fwd_http).is_err(),
                "the forward of the wrong-key client worked"
            );
        }
        bad.assert_running();
        // The logs say why (the daemon that can tell: the wrong-key client or the server).
        let why = poll(Duration::from_secs(15), || {
            let lines = [
                key_complaints(&bad.log_text()),
                key_complaints(&t.server.log_text()),
            ]
            .concat();
            (!lines.is_empty()).then_some(lines)
        });
        match why {
            Some(lines) => eprintln!("key mismatch reported: {}", lines[0]),
            None => panic!(
                "no log line mentions the key and crypto/guard\n--- wrong-key client ---\n{}\n--- server ---\n{}",
                bad.log_text(),
                t.server.log_text()
            ),
        }
        // The good client is unaffected.
        t.download_checked(t.socks(), 52, 8 * MIB, 60);
    }
}

/// Frames a third party in the middle namespace sends at the server's tunnel port: envelopes with random
/// payloads, the same cut short at random points, and random bytes behind a valid IPv4/TCP prefix.
fn flood(
    net: &Net,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<std::io::Result<Result<(), String>>> {
    let m = net.middle().expect("flood needs the routed topology");
    let m_ip = {
        let out = m.exec(&["ip", "-o", "-4", "addr", "show"]).unwrap();
        // M's address on the server's subnet (same /24 as the server).
        let prefix: String = net
            .server_ip
            .to_string()
            .rsplit_once('.')
            .unwrap()
            .0
            .to_owned()
            + ".";
        out.split_whitespace()
            .filter_map(|w| w.split_once('/').map(|(ip, _)| ip.to_owned()))
            .find(|ip| ip.starts_with(&prefix))
            .expect("M's address towards the server")
    };
    let m_ip: std::net::Ipv4Addr = m_ip.parse().unwrap();
    let dev = if_with_addr(m, m_ip);
    let src_mac = parse_mac(&if_mac(m, &dev));
    let dst_mac = parse_mac(&if_mac(net.server(), &net.server_if));
    let server = net.server_addr();
    m.spawn(move || -> Result<(), String> {
        let cdev = std::ffi::CString::new(dev.clone()).unwrap();
        // SAFETY: plain libc calls with valid arguments; the fd is closed below.
        let ifindex = unsafe { libc::if_nametoindex(cdev.as_ptr()) };
        if ifindex == 0 {
            return Err(format!("no interface {dev} in the middle namespace"));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        let rc = unsafe {
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(format!("bind AF_PACKET to {dev}: {e}"));
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0xF100D);
        let mut frame = vec![0u8; 2048];
        let mut payload = vec![0u8; 1400];
        let mut n: u64 = 0;
        let mut attempts: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            attempts += 1;
            let src = std::net::SocketAddr::from((m_ip, rng.gen_range(1024..65535)));
            let mut b = EnvelopeBuilder::new(src_mac, dst_mac, src, server, rng.gen())
                .map_err(|e| e.to_string())?;
            let plen = match attempts % 3 {
                0 => rng.gen_range(1..1400),
                1 => rng.gen_range(1..64),
                _ => rng.gen_range(100..1400),
            };
            rng.fill(&mut payload[..plen]);
            let len = b
                .emit_with_payload(TcpFlags::PSH | TcpFlags::ACK, &payload[..plen], &mut frame)
                .map_err(|e| e.to_string())?;
            let hdr = b.header_len(TcpFlags::PSH | TcpFlags::ACK);
            let send_len = match attempts % 3 {
                // Cut short: somewhere after the TCP ports, before the end of the payload.
                2 => rng.gen_range(14 + 20 + 4..hdr + plen),
                // Garbage behind the ports: random TCP header remainder and payload.
                1 => {
                    rng.fill(&mut frame[14 + 20 + 4..len]);
                    len
                }
                _ => len,
            };
            let rc = unsafe { libc::send(fd, frame.as_ptr().cast(), send_len, 0) };
            if rc >= 0 {
                n += 1;
                sent.store(n, Ordering::Relaxed);
            }
            // About 6,000 frames per second at most: a flood, not a CPU hog on two cores.
            if attempts.is_multiple_of(32) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        unsafe { libc::close(fd) };
        Ok(())
    })
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    v.try_into().unwrap_or_else(|_| panic!("bad MAC {s}"))
}

/// Bad packets the server counted: in userspace (guard drops, crypto failures, envelope errors) and, in
/// XDP mode, in the XDP program (frames dropped for a bad guard cookie, and frames with truncated or
/// inconsistent headers), which userspace never sees.
fn bad_packet_count(scrape: &str) -> f64 {
    metric_sum(scrape, "paqet_guard_drops_total")
        + metric_sum(scrape, "paqet_crypto_failures_total")
        + metric_sum(scrape, "paqet_envelope_errors_total")
        + series_sum(scrape, "paqet_xdp_packets_total{counter=\"guard_dropped\"}")
        + series_sum(scrape, "paqet_xdp_packets_total{counter=\"malformed\"}")
}

#[test]
fn flood_of_random_and_truncated_packets_is_counted_and_harmless() {
    if skip(
        "flood_of_random_and_truncated_packets_is_counted_and_harmless",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut o = Opts::new(modes);
        // Routed through a clean middle namespace: the third party sits there.
        o.link = Some(LinkSpec {
            delay_ms: 0,
            jitter_ms: 0,
            loss_pct: 0.0,
            dup_pct: 0.0,
            seed: 1,
        });
        let mut t = Tunnel::start("ffl", o);
        let before = bad_packet_count(&scrape(t.net.server()));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let flooder = flood(&t.net, stop.clone(), sent.clone());
        // Transfers run while the flood goes on.
        let took = t.download_checked(t.socks(), 61, 64 * MIB, 180);
        t.upload_checked(t.http_proxy(), 62, 16 * MIB, 120);
        stop.store(true, Ordering::Relaxed);
        flooder
            .join()
            .expect("flood thread")
            .expect("enter middle namespace")
            .expect("flood");
        let n = sent.load(Ordering::Relaxed);
        report("64 MiB down during the flood", 64 * MIB, took);
        assert!(n > 1000, "only {n} flood frames sent");
        t.server.assert_running();
        t.client.assert_running();
        let after = poll(Duration::from_secs(5), || {
            let v = bad_packet_count(&scrape(t.net.server()));
            (v > before).then_some(v)
        });
        match after {
            Some(v) => eprintln!(
                "{n} flood frames sent; server counted {} bad packets",
                v - before
            ),
            None => panic!(
                "{n} flood frames, but the server's bad-packet counters did not rise:\n{}",
                scrape(t.net.server())
            ),
        }
    }
}

#[test]
fn max_streams_per_session_rejects_the_excess() {
    if skip(
        "max_streams_per_session_rejects_the_excess",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut o = Opts::new(modes);
        o.conn = 1; // every stream on the one session
        o.server_kcp_extra = "max_streams_per_session = 4".into();
        let t = Tunnel::start("fms", o);
        // The readiness probe's stream must be gone before the count starts.
        let idle = wait_metric(t.net.server(), Duration::from_secs(15), |s| {
            metric_sum(s, "paqet_streams") == 0.0
        });
        assert!(
            idle.is_some(),
            "server streams never dropped to 0:\n{}",
            scrape(t.net.server())
        );
        let rejected_before = metric_sum(&scrape(t.net.server()), "paqet_limit_rejections_total");
        let gate = t.http.gate.clone();
        let len = 2 * MIB;
        let start = |i: u64, max_secs: u64| {
            let mut c = curl_cmd(t.net.client(), t.socks(), max_secs);
            c.arg(t.url(&format!("/hold/{}/{len}", 70 + i)));
            spawn_fetch(c)
        };
        // Four streams, one after the other, each held at the target once it arrived there.
        let mut admitted = Vec::new();
        for i in 0..4u64 {
            admitted.push(start(i, 90));
            let arrived = poll(Duration::from_secs(15), || {
                (gate.held.load(Ordering::SeqCst) > i as usize).then_some(())
            });
            if arrived.is_none() {
                gate.release.store(true, Ordering::SeqCst);
                panic!(
                    "stream {} of max_streams_per_session = 4 never reached the target ({} held); server metrics:\n{}",
                    i + 1,
                    gate.held.load(Ordering::SeqCst),
                    scrape(t.net.server())
                );
            }
        }
        // Two more while the four are open: refused (the download ends without data), never reach the target.
        for i in 4..6u64 {
            let f = start(i, 15).join().expect("fetch thread");
            assert!(
                !(f.ok && f.len > 0),
                "stream {} over the limit carried data: {f:?}",
                i + 1
            );
            eprintln!("stream {} refused: {}", i + 1, f.stderr.trim());
        }
        let held_now = gate.held.load(Ordering::SeqCst);
        gate.release.store(true, Ordering::SeqCst);
        assert_eq!(
            held_now, 4,
            "exactly max_streams_per_session requests reach the target"
        );
        for (i, j) in admitted.into_iter().enumerate() {
            let f = j.join().expect("fetch thread");
            assert!(f.ok && f.len == len, "admitted download {i}: {f:?}");
            assert_eq!(
                f.sha256,
                pattern_sha256(70 + i as u64, len),
                "admitted download {i}: sha256"
            );
        }
        let rejected = wait_metric(t.net.server(), Duration::from_secs(10), |s| {
            metric_sum(s, "paqet_limit_rejections_total") - rejected_before >= 2.0
        });
        assert!(
            rejected.is_some(),
            "paqet_limit_rejections_total did not rise by 2 from {rejected_before}:\n{}",
            scrape(t.net.server())
        );
        // Below the limit again: new streams work.
        t.download_checked(t.socks(), 79, MIB, 30);
    }
}

#[test]
fn max_sessions_rejects_the_excess() {
    if skip(
        "max_sessions_rejects_the_excess",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut o = Opts::new(modes);
        o.conn = 1;
        o.server_kcp_extra = "max_sessions = 1".into();
        let t = Tunnel::start("fmx", o);
        let rejected_before = metric_sum(&scrape(t.net.server()), "paqet_limit_rejections_total");
        // A second client: its session is over the limit.
        let mut second = t.spawn_client("client-excess", ClientPorts::SECOND, KEY);
        let big = t.net.client();
        let mut c = curl_cmd(big, t.socks(), 120);
        c.arg(t.url(&format!("/gen/81/{}", 32 * MIB)));
        let admitted = spawn_fetch(c);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut tries = 0;
        while Instant::now() < deadline {
            tries += 1;
            let f = fetch(
                t.net.client(),
                Via::Socks5(ClientPorts::SECOND.socks),
                &t.url("/gen/82/65536"),
                5,
            );
            assert!(
                !(f.ok && f.len > 0),
                "the excess session carried data (try {tries}): {f:?}"
            );
        }
        let f = admitted.join().expect("fetch thread");
        assert!(f.ok && f.len == 32 * MIB, "admitted download: {f:?}");
        assert_eq!(
            f.sha256,
            pattern_sha256(81, 32 * MIB),
            "admitted download: sha256"
        );
        second.assert_running();
        let rejected = wait_metric(t.net.server(), Duration::from_secs(10), |s| {
            metric_sum(s, "paqet_limit_rejections_total") > rejected_before
        });
        assert!(
            rejected.is_some(),
            "paqet_limit_rejections_total did not rise:\n{}",
            scrape(t.net.server())
        );
    }
}
