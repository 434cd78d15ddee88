//! Several servers (issue 12 item 2): a client with `server.addr` = three servers and `transport.conn = 3`
//! spreads its sessions over them (one each). While a paced echo transfer runs, a server that does not
//! carry it is killed: the client takes it out (`paqet_server_up` 0) from its session's keepalive, new
//! SOCKS5 connections keep working on the other two, the transfer completes intact (sha256); the killed
//! server is restarted and rejoins (`paqet_server_up` 1, a session placed on it again). All three servers
//! run with the guard off (upstream's wire: the client's guard setting is one for all servers). The servers
//! are pcap daemons on one address and three ports; the client runs in pcap and in XDP generic mode.
//! Root only; every wait is bounded.
mod common;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use paqet_testkit::netns::Netns;

/// The paced transfer: 256 chunks of 32 KiB, one every 40 ms (about 10 s: the outage fits inside).
const CHUNK: usize = 32 * 1024;
const CHUNKS: usize = 256;
const PACE: Duration = Duration::from_millis(40);
/// The extra servers' tunnel and metrics ports (same namespace and address as the main server).
const EXTRA: [(u16, u16); 2] = [(10001, 9101), (10002, 9102)];

fn echo_once(proxy: SocketAddr, target: SocketAddr, msg: &[u8]) -> Result<(), String> {
    let mut c = socks5_connect(proxy, target).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    c.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    (got == msg)
        .then_some(())
        .ok_or_else(|| "echo differs".into())
}

/// The client's figure for one server, e.g. `paqet_server_up` of `10.216.0.2:10001`.
fn server_metric(client_scrape: &str, name: &str, server: SocketAddr) -> f64 {
    series_sum(client_scrape, &format!("{name}{{server=\"{server}\"}}"))
}

/// Streams open on the server daemon whose metrics listen on `port`.
fn server_streams(ns: &Netns, port: u16) -> f64 {
    match http_get(ns, port, "/metrics") {
        Ok((200, body)) => metric_sum(&body, "paqet_streams"),
        _ => 0.0,
    }
}

fn several_servers(tag: &str, modes: (Mode, Mode)) {
    let mut opts = Opts::new(modes);
    opts.conn = 3;
    opts.smuxkalive = 1;
    opts.smuxktimeout = 3;
    opts.server_kcp_extra = "guard = false".into();
    let o = opts.clone();
    let extra: RefCell<Vec<(Daemon, String, SocketAddr, u16)>> = RefCell::new(Vec::new());
    let make = |net: &Net, http: &HttpServer, udp: &UdpEcho, dir: &std::path::Path| {
        let main = Tunnel::server_config(net, &o);
        let mut addrs = vec![format!("\"{}:{TUNNEL_PORT}\"", net.server_ip)];
        for (i, (port, metrics)) in EXTRA.iter().enumerate() {
            let cfg = main
                .replace(&format!(":{TUNNEL_PORT}\""), &format!(":{port}\""))
                .replace(
                    &format!("127.0.0.1:{METRICS_PORT}"),
                    &format!("127.0.0.1:{metrics}"),
                );
            assert!(cfg.contains(&format!(":{port}\"")) && cfg.contains("guard = false"));
            let name = format!("server{}", i + 2);
            let d = Daemon::spawn(net.server(), dir, &name, &cfg, Mode::Pcap, true);
            let addr = SocketAddr::from((net.server_ip, *port));
            extra.borrow_mut().push((d, name, addr, *metrics));
            addrs.push(format!("\"{addr}\""));
        }
        let client = Tunnel::client_config(net, &o, http, udp, ClientPorts::MAIN, KEY)
            .replace(
                &format!("addr = \"{}:{TUNNEL_PORT}\"", net.server_ip),
                &format!("addr = [{}]", addrs.join(", ")),
            )
            .replace("[transport.kcp]", "[transport.kcp]\nguard = false");
        assert!(client.contains("addr = [") && client.contains("guard = false"));
        (main, client)
    };
    let t = Tunnel::start_with(tag, opts, Some(&make));
    let mut extra = extra.into_inner();
    let servers: Vec<SocketAddr> = std::iter::once(t.net.server_addr())
        .chain(extra.iter().map(|e| e.2))
        .collect();
    let echo = tcp_echo(t.net.server());
    let proxy = SocketAddr::from(([127, 0, 0, 1], ClientPorts::MAIN.socks));
    let t0 = Instant::now();

    // One session on each server, all up.
    let spread = poll(Duration::from_secs(20), || {
        let s = scrape(t.net.client());
        servers
            .iter()
            .all(|&a| {
                server_metric(&s, "paqet_server_up", a) == 1.0
                    && server_metric(&s, "paqet_server_sessions", a) == 1.0
            })
            .then_some(())
    });
    assert!(
        spread.is_some(),
        "{modes:?}: sessions not spread one per server:\n{}",
        scrape(t.net.client())
    );

    // The paced transfer, in the background.
    let bulk = in_ns(t.net.client(), move || socks5_connect(proxy, echo))
        .unwrap_or_else(|e| panic!("{modes:?}: bulk connect: {e}"));
    let transfer = std::thread::spawn(move || paced_echo(bulk, 12, CHUNK, CHUNKS, PACE));
    // Kill an extra server that does not carry the transfer.
    std::thread::sleep(Duration::from_millis(500));
    let victim = extra
        .iter()
        .position(|e| server_streams(t.net.server(), e.3) == 0.0)
        .expect("one extra server carries no stream");
    let down_addr = extra[victim].2;
    extra[victim].0.kill();
    let killed_at = Instant::now();

    // Taken out by the client (keepalive timeout 3 s).
    let out = poll(Duration::from_secs(10), || {
        let s = scrape(t.net.client());
        (server_metric(&s, "paqet_server_up", down_addr) == 0.0).then_some(())
    });
    assert!(
        out.is_some(),
        "{modes:?}: {down_addr} not taken out:\n{}\n{}",
        scrape(t.net.client()),
        t.client.log_text()
    );
    let detected = killed_at.elapsed();
    // New connections keep working during the outage.
    for i in 0..6 {
        let msg = format!("during the outage {i}");
        in_ns(t.net.client(), move || {
            echo_once(proxy, echo, msg.as_bytes())
        })
        .unwrap_or_else(|e| panic!("{modes:?}: connection {i} during the outage: {e}"));
    }
    // Its slot is re-dialled to the other servers (metrics are published about once a second).
    let moved = poll(Duration::from_secs(5), || {
        let s = scrape(t.net.client());
        let live: f64 = servers
            .iter()
            .map(|&a| server_metric(&s, "paqet_server_sessions", a))
            .sum();
        (server_metric(&s, "paqet_server_sessions", down_addr) == 0.0 && live == 3.0).then_some(())
    });
    assert!(
        moved.is_some(),
        "{modes:?}: the dead server's slot was not re-dialled elsewhere:\n{}\n{}",
        scrape(t.net.client()),
        t.client.log_text()
    );

    // Restart: it rejoins and gets a session again.
    let (_, name, _, _) = &extra[victim];
    let cfg = std::fs::read_to_string(t.dir.path().join(format!("{name}.toml"))).unwrap();
    extra[victim].0 = Daemon::spawn(
        t.net.server(),
        t.dir.path(),
        &format!("{name}-again"),
        &cfg,
        Mode::Pcap,
        true,
    );
    let back = poll(Duration::from_secs(25), || {
        let s = scrape(t.net.client());
        (server_metric(&s, "paqet_server_up", down_addr) == 1.0
            && server_metric(&s, "paqet_server_sessions", down_addr) == 1.0)
            .then_some(())
    });
    assert!(
        back.is_some(),
        "{modes:?}: {down_addr} did not rejoin:\n{}\n{}",
        scrape(t.net.client()),
        t.client.log_text()
    );
    let rejoined = killed_at.elapsed();

    let (sent, got) = transfer
        .join()
        .expect("transfer thread")
        .unwrap_or_else(|e| panic!("{modes:?}: transfer across the outage: {e}"));
    assert_eq!(sent, got, "{modes:?}: transfer sha256");
    // New connections work after the rejoin (some on the rejoined server).
    for i in 0..6 {
        let msg = format!("after the rejoin {i}");
        in_ns(t.net.client(), move || {
            echo_once(proxy, echo, msg.as_bytes())
        })
        .unwrap_or_else(|e| panic!("{modes:?}: connection {i} after the rejoin: {e}"));
    }
    let log = t.client.log_text();
    assert_eq!(
        log.matches("server down").count(),
        1,
        "{modes:?}: down logged once:\n{log}"
    );
    assert!(log.contains("server up again"), "{modes:?}:\n{log}");
    extra[victim].0.assert_running();
    eprintln!(
        "{modes:?}: taken out {detected:?} after the kill, rejoined {rejoined:?} after it; test {:?}",
        t0.elapsed()
    );
}

#[test]
fn three_servers_one_killed_and_restarted_pcap() {
    if skip(
        "three_servers_one_killed_and_restarted_pcap",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    several_servers("msp", (Mode::Pcap, Mode::Pcap));
}

#[test]
fn three_servers_one_killed_and_restarted_xdp_generic() {
    if skip(
        "three_servers_one_killed_and_restarted_xdp_generic",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    several_servers("msx", (Mode::Pcap, Mode::XdpGeneric));
}
