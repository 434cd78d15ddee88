//! The daemon's wiring through the real binary (root only; skipped otherwise): `--manage-firewall` adds
//! and removes the iptables rules on both roles, `--key-file` overrides the configured key, the SOCKS5 and
//! HTTP proxy front ends carry a TCP echo, `/metrics` and `/readyz` answer from the live worker, and a
//! client with the wrong key makes the server log why nothing passes.
//!
//! Two namespaces joined by a veth pair; every address is inside them. Children are killed in `Drop`.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use paqet_testkit::netns::Netns;

const PORT: u16 = 9931;
const KEY: &str = "paqet-dp-wiring-test-key";

/// Starts `paqet-dp run --mode pcap --manage-firewall EXTRA` on `config` in `ns`.
fn spawn_daemon(ns: &Netns, dir: &TempDir, name: &str, config: &str, extra: &[&str]) -> Daemon {
    let args = [&["--manage-firewall"], extra].concat();
    Daemon::spawn_with(ns, dir.path(), name, config, Mode::Pcap, &args)
}

/// Waits until `cond` holds (bounded); whether it did.
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll(within, || cond().then_some(())).is_some()
}

/// Our rules (comment `paqet-dp`) in the raw and mangle tables of `ns`.
fn our_rules(ns: &Netns) -> Vec<String> {
    let mut v = Vec::new();
    for table in ["raw", "mangle"] {
        let out = ns
            .exec(&["iptables", "-w", "-t", table, "-S"])
            .expect("iptables -S");
        v.extend(
            out.lines()
                .filter(|l| l.contains("paqet-dp"))
                .map(str::to_owned),
        );
    }
    v
}

/// Writes `msg` on `c` and reads the same number of bytes back (the echo server answers).
fn echo_round(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    c.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)?;
    Ok(got)
}

fn via_socks5(proxy: SocketAddr, target: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&proxy, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    c.read_exact(&mut m)?;
    if m != [5, 0] {
        return Err(std::io::Error::other(format!("socks5 method reply {m:?}")));
    }
    let SocketAddr::V4(t) = target else {
        unreachable!("IPv4 target")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    c.write_all(&req)?;
    let mut rep = [0u8; 10];
    c.read_exact(&mut rep)?;
    if rep[1] != 0 {
        return Err(std::io::Error::other(format!(
            "socks5 CONNECT reply code {}",
            rep[1]
        )));
    }
    echo_round(&mut c, msg)
}

fn via_http_connect(proxy: SocketAddr, target: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&proxy, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(c, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b)?;
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("CONNECT answered {head:?}")));
    }
    echo_round(&mut c, msg)
}

/// Both daemons' logs, for a failure message.
fn logs(client: &Daemon, server: &Daemon) -> String {
    format!(
        "--- client ---\n{}\n--- server ---\n{}",
        client.log_text(),
        server.log_text()
    )
}

#[test]
fn front_ends_metrics_firewall_and_wrong_key() {
    if skip("front_ends_metrics_firewall_and_wrong_key", &[]) {
        return;
    }
    let net = Net::direct("wir");
    let (ns_a, ns_b) = (net.client(), net.server());
    let (dev_a, dev_b) = (&net.client_if, &net.server_if);
    let (ip_a, ip_b) = (net.client_ip, net.server_ip);
    // Each side's own MAC is the other side's next hop.
    let (mac_a, mac_b) = (&net.server_gw_mac, &net.client_gw_mac);

    // TCP echo on the server side's loopback.
    let echo = tcp_echo(ns_b);

    let dir = TempDir::new("wiring");
    let server_cfg = format!(
        r#"role = "server"
[log]
level = "info"
[listen]
addr = ":{PORT}"
[network]
interface = "{dev_b}"
[network.ipv4]
addr = "{ip_b}:{PORT}"
router_mac = "{mac_a}"
[transport]
protocol = "kcp"
[transport.kcp]
mode = "fast3"
key = "{KEY}"
[metrics]
listen = "127.0.0.1:{METRICS_PORT}"
"#
    );
    // The client's configured key is a placeholder: the real one comes from --key-file.
    let client_cfg = |key: &str, socks: u16, http: u16, metrics: u16| {
        format!(
            r#"role = "client"
[log]
level = "info"
[server]
addr = "{ip_b}:{PORT}"
[network]
interface = "{dev_a}"
[network.ipv4]
addr = "{ip_a}:0"
router_mac = "{mac_b}"
[transport]
protocol = "kcp"
[transport.kcp]
mode = "fast3"
key = "{key}"
[[socks5]]
listen = "127.0.0.1:{socks}"
[[http]]
listen = "127.0.0.1:{http}"
[metrics]
listen = "127.0.0.1:{metrics}"
[debug]
pprof = "127.0.0.1:{pprof}"
"#,
            pprof = metrics + 1
        )
    };
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    // A key file must not be group/world-readable.
    std::fs::set_permissions(
        &key_file,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();

    let mut server = spawn_daemon(ns_b, &dir, "server", &server_cfg, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || our_rules(ns_b).len() == 4),
        "server rules not applied: {:?}\n{}",
        our_rules(ns_b),
        server.log_text()
    );

    // 1. A client with the wrong key: nothing passes and the server says why.
    {
        let mut bad = spawn_daemon(
            ns_a,
            &dir,
            "bad-client",
            &client_cfg("a-wrong-key", 11081, 18089, 19111),
            &[],
        );
        let r = in_ns(ns_a, move || {
            let proxy = SocketAddr::from(([127, 0, 0, 1], 11081));
            retry(Duration::from_secs(10), || {
                TcpStream::connect_timeout(&proxy, Duration::from_secs(1))
            })?;
            via_socks5(proxy, echo, b"must not pass")
        });
        assert!(r.is_err(), "data passed with the wrong key");
        assert!(
            wait_until(Duration::from_secs(10), || server
                .log_text()
                .contains("failed the guard check")),
            "server log does not explain the wrong key:\n{}",
            server.log_text()
        );
        assert!(bad.terminate(), "bad client did not exit on SIGTERM");
        assert!(
            our_rules(ns_a).is_empty(),
            "bad client left rules behind: {:?}",
            our_rules(ns_a)
        );
    }

    // 2. The good client (key from --key-file): SOCKS5, HTTP CONNECT, metrics, readiness.
    let key_arg = key_file.to_str().unwrap().to_owned();
    let mut client = spawn_daemon(
        ns_a,
        &dir,
        "client",
        &client_cfg(
            "placeholder-overridden-by-key-file",
            11080,
            18088,
            METRICS_PORT,
        ),
        &["--key-file", &key_arg],
    );
    assert!(
        wait_until(Duration::from_secs(10), || our_rules(ns_a).len() == 4),
        "client rules not applied: {:?}\n{}",
        our_rules(ns_a),
        client.log_text()
    );
    let echoes = in_ns(ns_a, move || -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        let socks = SocketAddr::from(([127, 0, 0, 1], 11080));
        let http = SocketAddr::from(([127, 0, 0, 1], 18088));
        let a = retry(Duration::from_secs(20), || {
            via_socks5(socks, echo, b"hello through socks5")
        })?;
        let b = retry(Duration::from_secs(10), || {
            via_http_connect(http, echo, b"hello through http")
        })?;
        Ok((a, b))
    });
    let (a, b) =
        echoes.unwrap_or_else(|e| panic!("client side failed: {e}\n{}", logs(&client, &server)));
    assert_eq!(a, b"hello through socks5");
    assert_eq!(b, b"hello through http");
    // The publisher runs every 500 ms: wait for a snapshot (answered 200) with the live session.
    let body = wait_metric(ns_a, Duration::from_secs(10), |t| {
        series_sum(t, "paqet_sessions{role=\"client\"}") >= 1.0
    })
    .unwrap_or_else(|| {
        panic!(
            "no live session in the client's /metrics\n{}",
            logs(&client, &server)
        )
    });
    // Readiness is read from the workers' published snapshots too: on a loaded machine the first answer may
    // predate the snapshot above, so wait (bounded) for 200.
    let ready = poll(Duration::from_secs(10), || {
        match http_get(ns_a, METRICS_PORT, "/readyz")
            .unwrap_or_else(|e| panic!("/readyz: {e}\n{}", logs(&client, &server)))
        {
            (200, _) => Some(()),
            (st, body) => {
                eprintln!("/readyz: {st} {body}");
                None
            }
        }
    });
    let pprof_metrics = http_get(ns_a, METRICS_PORT + 1, "/metrics")
        .unwrap_or_else(|e| panic!("pprof /metrics: {e}\n{}", logs(&client, &server)))
        .0;
    assert!(
        metric_sum(&body, "paqet_packets_total") > 0.0,
        "no packets counted:\n{body}"
    );
    assert!(body.contains("paqet_kcp_srtt_seconds"), "no srtt:\n{body}");
    assert!(ready.is_some(), "client not ready with a live session");
    assert_eq!(
        pprof_metrics, 200,
        "debug.pprof server does not serve /metrics"
    );

    // The server's metrics count the session too (once its worker published, every 500 ms).
    let srv = wait_sessions(ns_b, "server", 1);
    assert!(
        metric_sum(&srv, "paqet_guard_drops_total") > 0.0,
        "guard drops not counted:\n{srv}"
    );
    assert!(
        metric_sum(&srv, "paqet_session_opens_total") >= 1.0,
        "opens not counted:\n{srv}"
    );

    // 3. Graceful exits remove the rules.
    terminate_clean(ns_a, &mut client);
    terminate_clean(ns_b, &mut server);
}

/// The `/metrics` text of the daemon in `ns` once it counts at least `n` live `role` sessions (bounded
/// wait: the workers publish every 500 ms).
fn wait_sessions(ns: &Netns, role: &str, n: u32) -> String {
    let series = format!("paqet_sessions{{role=\"{role}\"}}");
    wait_metric(ns, Duration::from_secs(10), |t| {
        series_sum(t, &series) >= f64::from(n)
    })
    .unwrap_or_else(|| {
        panic!(
            "fewer than {n} live sessions in the {role}'s /metrics:\n{}",
            scrape(ns)
        )
    })
}

/// SIGTERMs `d` (running in `ns`) and checks it exited by itself and left none of our rules behind.
fn terminate_clean(ns: &Netns, d: &mut Daemon) {
    assert!(
        d.terminate(),
        "{} did not exit on SIGTERM:\n{}",
        d.name,
        d.log_text()
    );
    assert!(
        our_rules(ns).is_empty(),
        "{} left rules behind: {:?}",
        d.name,
        our_rules(ns)
    );
}

/// One datagram through the UDP forward at 127.0.0.1:`fwd` and its echo back.
fn via_udp_forward(fwd: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let u = std::net::UdpSocket::bind("127.0.0.1:0")?;
    u.set_read_timeout(Some(Duration::from_secs(2)))?;
    u.send_to(msg, ("127.0.0.1", fwd))?;
    let mut buf = [0u8; 2048];
    let n = u.recv(&mut buf)?;
    Ok(buf[..n].to_vec())
}

/// The daemon assembly is one code path for every data plane: the same client configuration (a TCP and a
/// UDP forward, SOCKS5, HTTP proxy, metrics; `conn = 2`) run by the binary with `--mode pcap` (one worker)
/// and `--mode xdp-native` (one worker per RX queue of a two-queue veth, front ends on `SO_REUSEPORT`
/// listeners of both workers, the UDP forward on one) answers on every front end, and `--manage-firewall`
/// adds rules only where the kernel sees tunnel packets (pcap) and removes them on exit.
#[test]
fn every_front_end_answers_in_pcap_and_xdp_mode() {
    if skip("every_front_end_answers_in_pcap_and_xdp_mode", &["ethtool"]) {
        return;
    }
    if !paqet::io::steer::has_xdp_program() {
        eprintln!(
            "skipped every_front_end_answers_in_pcap_and_xdp_mode: this build has no XDP program"
        );
        return;
    }
    let net = Net::direct_queues("wfe", 2);
    let (ns_a, ns_b) = (net.client(), net.server());
    let echo = tcp_echo(ns_b);
    let udp = UdpEcho::start(ns_b);
    let dir = TempDir::new("wiring-fe");
    // The common tunnel configs (conn = 2): TCP forward to the echo server, UDP forward to the UDP echo,
    // SOCKS5, HTTP proxy and metrics on the client.
    let opts = Opts::new((Mode::Pcap, Mode::Pcap));
    let server_cfg = Tunnel::server_config(&net, &opts);
    let ports = ClientPorts::MAIN;
    let client_cfg = Tunnel::client_config_to(&net, &opts, echo, udp.addr, ports, &opts.client_key);
    let (tcp_fwd, udp_fwd, socks, http) = (ports.fwd_http, ports.fwd_udp, ports.socks, ports.http);
    let mut server = spawn_daemon(ns_b, &dir, "server", &server_cfg, &[]);
    for (mode, rules, workers) in [(Mode::Pcap, 4, 1), (Mode::XdpNative, 0, 2)] {
        let name = format!("client-{}", mode.arg());
        let mut client = Daemon::spawn_with(
            ns_a,
            dir.path(),
            &name,
            &client_cfg,
            mode,
            &["--manage-firewall"],
        );
        let running = format!("workers={workers}");
        assert!(
            wait_until(Duration::from_secs(30), || {
                client.assert_running();
                client.log_text().contains("paqet-dp running")
            }),
            "{name} did not start:\n{}",
            logs(&client, &server)
        );
        let log = client.log_text();
        assert!(log.contains(&running), "{name}: not {running}:\n{log}");
        assert_eq!(
            our_rules(ns_a).len(),
            rules,
            "{name}: iptables rules {:?}",
            our_rules(ns_a)
        );
        let r = in_ns(ns_a, move || -> std::io::Result<()> {
            let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            // Several connections per TCP front end, so both workers' listeners take some in XDP mode.
            for i in 0..6u8 {
                let msg = [b'f', b'w', i];
                let got = retry(Duration::from_secs(20), || {
                    let mut c = TcpStream::connect_timeout(&at(tcp_fwd), Duration::from_secs(2))?;
                    c.set_read_timeout(Some(Duration::from_secs(5)))?;
                    echo_round(&mut c, &msg)
                })?;
                assert_eq!(got, msg, "TCP forward");
                let msg = [b's', b'5', i];
                assert_eq!(via_socks5(at(socks), echo, &msg)?, msg, "SOCKS5");
                let msg = [b'h', b't', i];
                assert_eq!(via_http_connect(at(http), echo, &msg)?, msg, "HTTP proxy");
            }
            let got = retry(Duration::from_secs(10), || via_udp_forward(udp_fwd, b"udp"))?;
            assert_eq!(got, b"udp", "UDP forward");
            Ok(())
        });
        r.unwrap_or_else(|e| {
            panic!(
                "{name}: a front end failed: {e}\n{}",
                logs(&client, &server)
            )
        });
        let body = wait_sessions(ns_a, "client", 2);
        assert!(metric_sum(&body, "paqet_packets_total") > 0.0, "{body}");
        terminate_clean(ns_a, &mut client);
    }
    terminate_clean(ns_b, &mut server);
}
