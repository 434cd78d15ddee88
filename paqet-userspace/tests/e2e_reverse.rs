//! Reverse forwards end to end through the real `paqet-dp` binary (root only; skipped otherwise): the
//! server listens on addresses its client declared in `[[reverse]]` and carries each connection back to
//! services in the client's namespace. Per mode (pcap, XDP generic): 200 MiB down and 16 MiB up over a
//! reverse TCP forward (sha256-checked), UDP round trips over a reverse UDP forward, the refusal of a
//! declared entry outside `server.reverse_allow` (client log + metrics), no listener for an allowed but
//! undeclared address, and the listener coming back after the client restarts (its old session still holds
//! the address until it times out: the client declares again until it gets it). Then a server with
//! reverse forwards off (the stand-in for an upstream server: it closes the declaration without an answer,
//! as upstream does for a header type it does not know): the client logs the clear error at once and its
//! forward keeps working.
mod common;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use paqet_testkit::netns::Netns;

const MIB: u64 = 1 << 20;
/// Reverse listeners in the server namespace (loopback).
const REV_TCP: u16 = 18022;
const REV_UDP: u16 = 18053;
/// Declared by the client but not in `server.reverse_allow`.
const REV_DENIED: u16 = 18099;
/// In `server.reverse_allow` but declared by no client.
const REV_UNDECLARED: u16 = 18077;

fn server_cfg(net: &Net, o: &Opts, reverse: bool) -> String {
    let mut s = Tunnel::server_config(net, o);
    if reverse {
        s.push_str(&format!(
            "[server]\nreverse_allow = [\"127.0.0.1:{REV_TCP}\", \"127.0.0.1:{REV_UDP}\", \"127.0.0.1:{REV_UNDECLARED}\"]\n"
        ));
    }
    s
}

fn client_cfg(
    net: &Net,
    o: &Opts,
    http: &HttpServer,
    udp: &UdpEcho,
    rev_http: SocketAddr,
    rev_udp: SocketAddr,
) -> String {
    let mut c = Tunnel::client_config(net, o, http, udp, ClientPorts::MAIN, &o.client_key);
    c.push_str(&format!(
        r#"[[reverse]]
name = "web"
remote = "127.0.0.1:{REV_TCP}"
target = "{rev_http}"
protocol = "tcp"
[[reverse]]
name = "echo-udp"
remote = "127.0.0.1:{REV_UDP}"
target = "{rev_udp}"
protocol = "udp"
[[reverse]]
name = "not-allowed"
remote = "127.0.0.1:{REV_DENIED}"
target = "{rev_http}"
protocol = "tcp"
"#
    ));
    c
}

fn rev_url(path: &str) -> String {
    format!("http://127.0.0.1:{REV_TCP}{path}")
}

/// GET `path` from the reverse TCP listener, from the server namespace.
fn rev_fetch(ns: &Netns, path: &str, max_secs: u64) -> Fetched {
    let mut c = curl_direct(ns, max_secs);
    c.arg(rev_url(path));
    spawn_fetch(c).join().expect("fetch thread")
}

/// Whether a TCP connect to `127.0.0.1:port` in `ns` succeeds.
fn tcp_open(ns: &Netns, port: u16) -> bool {
    in_ns(ns, move || {
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )
        .is_ok()
    })
}

/// `n` UDP round trips through the reverse UDP listener from the server namespace.
fn udp_round_trips(ns: &Netns, n: usize) -> Result<(), String> {
    let sock = in_ns(ns, || UdpSocket::bind("127.0.0.1:0").expect("bind UDP"));
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let to = SocketAddr::from(([127, 0, 0, 1], REV_UDP));
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let msg = pattern_bytes(500 + i as u64, 100 + 13 * i);
        sock.send_to(&msg, to).map_err(|e| e.to_string())?;
        let (len, _) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("datagram {i}: {e}"))?;
        if buf[..len] != msg[..] {
            return Err(format!("datagram {i}: echo differs"));
        }
    }
    Ok(())
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool, t: &Tunnel) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{what} not within {within:?}\n--- client log\n{}\n--- server log\n{}",
        t.client.log_text(),
        t.server.log_text()
    );
}

fn spawn_client(t: &Tunnel, cfg_path: &Path, name: &str) -> Daemon {
    let cfg = std::fs::read_to_string(cfg_path).expect("client config");
    let fw = t.opts.client_mode.needs_firewall() && run_supports("--manage-firewall");
    Daemon::spawn(
        t.net.client(),
        t.dir.path(),
        name,
        &cfg,
        t.opts.client_mode,
        fw,
    )
}

#[test]
fn reverse_tcp_udp_refusal_and_restart() {
    if skip(
        "reverse_tcp_udp_refusal_and_restart",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in &[
        (Mode::Pcap, Mode::Pcap),
        (Mode::XdpGeneric, Mode::XdpGeneric),
    ] {
        eprintln!("== modes {modes:?}");
        let started = Instant::now();
        let configs = |net: &Net, http: &HttpServer, udp: &UdpEcho, _: &Path| {
            // The reverse targets live on the client's side.
            let rh = HttpServer::start(net.client()).addr;
            let ru = UdpEcho::start(net.client()).addr;
            let o = Opts::new(modes);
            (
                server_cfg(net, &o, true),
                client_cfg(net, &o, http, udp, rh, ru),
            )
        };
        let mut t = Tunnel::start_with("rev", Opts::new(modes), Some(&configs));
        let s = t.net.server();

        wait_for(
            "reverse TCP listener",
            Duration::from_secs(15),
            || tcp_open(s, REV_TCP),
            &t,
        );

        // 200 MiB from the client's side to the server's side, 16 MiB the other way.
        let len = 200 * MIB;
        let f = rev_fetch(s, &format!("/gen/7/{len}"), 120);
        assert!(
            f.ok && f.len == len,
            "reverse download: {f:?}\n{}",
            t.client.log_text()
        );
        assert_eq!(f.sha256, pattern_sha256(7, len), "reverse download: sha256");
        let up = 16 * MIB;
        let file = t.dir.path().join("up.bin");
        let want = write_pattern_file(&file, 9, up);
        let out = curl_direct(s, 60)
            .args(["-T", &file.to_string_lossy(), &rev_url("/upload")])
            .output()
            .expect("curl upload");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "reverse upload: {out:?}"
        );

        // UDP.
        udp_round_trips(s, 20)
            .unwrap_or_else(|e| panic!("reverse UDP: {e}\n{}", t.client.log_text()));

        // Refused (declared, not allowed) and undeclared (allowed, not declared): no listener.
        assert!(
            !tcp_open(s, REV_DENIED),
            "a declared entry outside server.reverse_allow got a listener"
        );
        assert!(
            !tcp_open(s, REV_UNDECLARED),
            "the server listens on an address no client declared"
        );
        let log = t.client.log_text();
        assert!(
            log.contains("\"not-allowed\"")
                && log.contains("refused by the server")
                && log.contains("server.reverse_allow"),
            "client log does not name the refused entry:\n{log}"
        );
        let m = scrape(s);
        assert!(
            series_sum(&m, "paqet_reverse_refusals_total{reason=\"not_allowed\"}") >= 1.0,
            "server refusal metric:\n{m}"
        );
        assert!(
            series_sum(
                &m,
                &format!("paqet_reverse_connections_total{{name=\"tcp/127.0.0.1:{REV_TCP}\"}}")
            ) >= 2.0,
            "server connection metric:\n{m}"
        );
        let m = scrape(t.net.client());
        assert!(
            series_sum(&m, "paqet_reverse_connections_total{name=\"web\"}") >= 2.0,
            "client connection metric:\n{m}"
        );

        // Client restart: the old session holds the listeners until it times out; the new one gets them.
        let cfg = t.dir.path().join("client.toml");
        t.client.stop();
        let restarted = spawn_client(&t, &cfg, "client-restarted");
        t.client = restarted;
        wait_for(
            "reverse forward after the client restarted",
            Duration::from_secs(40),
            || {
                let f = rev_fetch(s, "/gen/3/1000", 5);
                f.ok && f.sha256 == pattern_sha256(3, 1000)
            },
            &t,
        );
        udp_round_trips(s, 3).unwrap_or_else(|e| panic!("reverse UDP after restart: {e}"));
        eprintln!("== modes {modes:?} done in {:?}", started.elapsed());
    }
}

#[test]
fn reverse_against_a_server_without_them() {
    if skip(
        "reverse_against_a_server_without_them",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    let modes = (Mode::Pcap, Mode::Pcap);
    let configs = |net: &Net, http: &HttpServer, udp: &UdpEcho, _: &Path| {
        let rh = HttpServer::start(net.client()).addr;
        let ru = UdpEcho::start(net.client()).addr;
        let o = Opts::new(modes);
        (
            server_cfg(net, &o, false),
            client_cfg(net, &o, http, udp, rh, ru),
        )
    };
    let started = Instant::now();
    let t = Tunnel::start_with("rvo", Opts::new(modes), Some(&configs));
    let log = poll(Duration::from_secs(15), || {
        let l = t.client.log_text();
        l.contains("server does not support reverse forwards")
            .then_some(l)
    })
    .unwrap_or_else(|| panic!("no clear error in the client log:\n{}", t.client.log_text()));
    assert!(
        log.contains("[[reverse]]"),
        "the error names [[reverse]]:\n{log}"
    );
    assert!(started.elapsed() < Duration::from_secs(40), "bounded time");
    assert!(
        !tcp_open(t.net.server(), REV_TCP),
        "a server with reverse forwards off listens"
    );
    // The rest of the tunnel keeps working.
    let f = fetch(t.net.client(), t.socks(), &t.url("/gen/5/100000"), 20);
    assert!(
        f.ok && f.sha256 == pattern_sha256(5, 100_000),
        "SOCKS5 after the refusal: {f:?}"
    );
    let m = scrape(t.net.client());
    assert!(
        series_sum(&m, "paqet_reverse_refusals_total{reason=\"unsupported\"}") >= 1.0,
        "client metric:\n{m}"
    );
}
