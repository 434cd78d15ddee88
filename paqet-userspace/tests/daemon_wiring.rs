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
    let srv = wait_metric(ns_b, Duration::from_secs(10), |t| {
        series_sum(t, "paqet_sessions{role=\"server\"}") >= 1.0
    })
    .unwrap_or_else(|| {
        panic!(
            "no live session in the server's /metrics:\n{}",
            scrape(ns_b)
        )
    });
    assert!(
        metric_sum(&srv, "paqet_guard_drops_total") > 0.0,
        "guard drops not counted:\n{srv}"
    );
    assert!(
        metric_sum(&srv, "paqet_session_opens_total") >= 1.0,
        "opens not counted:\n{srv}"
    );

    // 3. Graceful exits remove the rules.
    assert!(
        client.terminate(),
        "client did not exit on SIGTERM:\n{}",
        client.log_text()
    );
    assert!(
        our_rules(ns_a).is_empty(),
        "client left rules behind: {:?}",
        our_rules(ns_a)
    );
    assert!(
        server.terminate(),
        "server did not exit on SIGTERM:\n{}",
        server.log_text()
    );
    assert!(
        our_rules(ns_b).is_empty(),
        "server left rules behind: {:?}",
        our_rules(ns_b)
    );
}
