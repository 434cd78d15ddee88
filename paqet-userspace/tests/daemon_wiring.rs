//! The daemon's wiring through the real binary (root only; skipped otherwise): `--manage-firewall` adds
//! and removes the iptables rules on both roles, `--key-file` overrides the configured key, the SOCKS5 and
//! HTTP proxy front ends carry a TCP echo, `/metrics` and `/readyz` answer from the live worker, and a
//! client with the wrong key makes the server log why nothing passes.
//!
//! Two namespaces joined by a veth pair; every address is inside them. Children are killed in `Drop`.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use paqet::io::netns::{is_root, Netns, VethPair};

const PORT: u16 = 9931;
const KEY: &str = "paqet-dp-wiring-test-key";

/// A `paqet-dp run` child, stopped with SIGTERM (then killed) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
    name: &'static str,
}

impl Daemon {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns whether it exited by itself.
    fn stop(&mut self) -> bool {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- {} log ({}) ----\n{}", self.name, self.log.display(), self.log_text());
        }
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_daemon(ns: &Netns, dir: &TempDir, name: &'static str, config: &str, extra: &[&str]) -> Daemon {
    let cfg = dir.0.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = dir.0.join(format!("{name}.log"));
    let logf = std::fs::File::create(&log).unwrap();
    let child = ns
        .command(env!("CARGO_BIN_EXE_paqet-dp"))
        .args(["run", "-c", cfg.to_str().unwrap(), "--mode", "pcap", "--manage-firewall"])
        .args(extra)
        .env_remove("PAQET_LOG")
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn paqet-dp");
    Daemon { child, log, name }
}

/// Retries `f` until it succeeds or `within` passes.
fn retry<T>(within: Duration, mut f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until `cond` holds (bounded); the last value is returned either way.
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Our rules (comment `paqet-dp`) in the raw and mangle tables of `ns`.
fn our_rules(ns: &Netns) -> Vec<String> {
    let mut v = Vec::new();
    for table in ["raw", "mangle"] {
        let out = ns.exec(&["iptables", "-w", "-t", table, "-S"]).expect("iptables -S");
        v.extend(out.lines().filter(|l| l.contains("paqet-dp")).map(str::to_owned));
    }
    v
}

/// One HTTP/1.1 GET; returns (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    c.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {resp:?}")))?;
    let body = resp.split_once("\r\n\r\n").map(|x| x.1.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The value of the first sample line starting with `prefix`.
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
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
    let SocketAddr::V4(t) = target else { unreachable!("IPv4 target") };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    c.write_all(&req)?;
    let mut rep = [0u8; 10];
    c.read_exact(&mut rep)?;
    if rep[1] != 0 {
        return Err(std::io::Error::other(format!("socks5 CONNECT reply code {}", rep[1])));
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

/// What the client namespace observed: echoes via SOCKS5 and HTTP, `/metrics` (status, body), `/readyz`
/// status, and the status of `/metrics` on the pprof server.
type ClientSide = (Vec<u8>, Vec<u8>, (u16, String), u16, u16);

#[test]
fn front_ends_metrics_firewall_and_wrong_key() {
    if !is_root() {
        eprintln!("skipped: daemon_wiring needs root (network namespaces, pcap, iptables)");
        return;
    }
    let pid = std::process::id();
    let k = pid % 250 + 1;
    let (ip_a, ip_b) = (format!("10.215.{k}.1"), format!("10.215.{k}.2"));
    let (mac_a, mac_b) = ("02:00:00:e3:e0:01", "02:00:00:e3:e0:02");
    let ns_a = Netns::new("wa").expect("netns a");
    let ns_b = Netns::new("wb").expect("netns b");
    let (dev_a, dev_b) = (format!("pw{pid}a"), format!("pw{pid}b"));
    let veth = VethPair::new(&dev_a, &dev_b, &ns_a, &ns_b).expect("veth");
    ns_a.exec(&["ip", "link", "set", &dev_a, "address", mac_a]).unwrap();
    ns_b.exec(&["ip", "link", "set", &dev_b, "address", mac_b]).unwrap();
    veth.configure(&ns_a, &ns_b, &format!("{ip_a}/24"), &format!("{ip_b}/24"), true).expect("addresses");

    // TCP echo on the server side's loopback.
    let echo = ns_b
        .spawn(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(mut c) = c else { return };
                    std::thread::spawn(move || {
                        let mut w = c.try_clone().unwrap();
                        let _ = std::io::copy(&mut c, &mut w);
                    });
                }
            });
            addr
        })
        .join()
        .unwrap()
        .expect("echo server");

    let dir = TempDir(std::env::temp_dir().join(format!("paqet-wiring-{pid}")));
    std::fs::create_dir_all(&dir.0).unwrap();
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
listen = "127.0.0.1:19100"
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
    let key_file = dir.0.join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();

    let mut server = spawn_daemon(&ns_b, &dir, "server", &server_cfg, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || our_rules(&ns_b).len() == 3),
        "server rules not applied: {:?}\n{}",
        our_rules(&ns_b),
        server.log_text()
    );

    // 1. A client with the wrong key: nothing passes and the server says why.
    {
        let mut bad = spawn_daemon(&ns_a, &dir, "bad-client", &client_cfg("a-wrong-key", 11081, 18089, 19111), &[]);
        let r = ns_a
            .spawn(move || {
                let proxy: SocketAddr = "127.0.0.1:11081".parse().unwrap();
                retry(Duration::from_secs(10), || TcpStream::connect_timeout(&proxy, Duration::from_secs(1)))?;
                via_socks5(proxy, echo, b"must not pass")
            })
            .join()
            .unwrap()
            .expect("netns");
        assert!(r.is_err(), "data passed with the wrong key");
        assert!(
            wait_until(Duration::from_secs(10), || server.log_text().contains("failed the guard check")),
            "server log does not explain the wrong key:\n{}",
            server.log_text()
        );
        assert!(bad.stop(), "bad client did not exit on SIGTERM");
        assert!(our_rules(&ns_a).is_empty(), "bad client left rules behind: {:?}", our_rules(&ns_a));
    }

    // 2. The good client (key from --key-file): SOCKS5, HTTP CONNECT, metrics, readiness.
    let key_arg = key_file.to_str().unwrap().to_owned();
    let mut client = spawn_daemon(
        &ns_a,
        &dir,
        "client",
        &client_cfg("placeholder-overridden-by-key-file", 11080, 18088, 19101),
        &["--key-file", &key_arg],
    );
    assert!(
        wait_until(Duration::from_secs(10), || our_rules(&ns_a).len() == 3),
        "client rules not applied: {:?}\n{}",
        our_rules(&ns_a),
        client.log_text()
    );
    let r = ns_a
        .spawn(move || -> std::io::Result<ClientSide> {
            let socks: SocketAddr = "127.0.0.1:11080".parse().unwrap();
            let http: SocketAddr = "127.0.0.1:18088".parse().unwrap();
            let a = retry(Duration::from_secs(20), || via_socks5(socks, echo, b"hello through socks5"))?;
            let b = retry(Duration::from_secs(10), || via_http_connect(http, echo, b"hello through http"))?;
            let metrics: SocketAddr = "127.0.0.1:19101".parse().unwrap();
            // The publisher runs every 500 ms: wait for a snapshot with the live session.
            let m = retry(Duration::from_secs(10), || {
                let (st, body) = http_get(metrics, "/metrics")?;
                match sample(&body, "paqet_sessions{role=\"client\"}") {
                    Some(v) if v >= 1.0 => Ok((st, body)),
                    _ => Err(std::io::Error::other(format!("no live session in /metrics yet:\n{body}"))),
                }
            })?;
            // Readiness is read from the workers' published snapshots too: on a loaded machine the first
            // answer may predate the snapshot above, so wait (bounded) for 200 and keep the last answer.
            let mut ready = 0;
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while ready != 200 && std::time::Instant::now() < until {
                let (st, body) = http_get(metrics, "/readyz")?;
                ready = st;
                if st != 200 {
                    eprintln!("/readyz: {st} {body}");
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            let pprof_metrics = http_get("127.0.0.1:19102".parse().unwrap(), "/metrics")?.0;
            Ok((a, b, m, ready, pprof_metrics))
        })
        .join()
        .unwrap()
        .expect("netns");
    let (a, b, (status, body), ready, pprof_metrics) = match r {
        Ok(x) => x,
        Err(e) => panic!("client side failed: {e}\n--- client ---\n{}\n--- server ---\n{}", client.log_text(), server.log_text()),
    };
    assert_eq!(a, b"hello through socks5");
    assert_eq!(b, b"hello through http");
    assert_eq!(status, 200);
    assert!(sample(&body, "paqet_packets_total{").is_some_and(|v| v > 0.0), "no packets counted:\n{body}");
    assert!(body.contains("paqet_kcp_srtt_seconds"), "no srtt:\n{body}");
    assert_eq!(ready, 200, "client not ready with a live session");
    assert_eq!(pprof_metrics, 200, "debug.pprof server does not serve /metrics");

    // The server's metrics count the session too (once its worker published, every 500 ms).
    let srv = ns_b
        .spawn(|| {
            retry(Duration::from_secs(10), || {
                let (_, body) = http_get("127.0.0.1:19100".parse().unwrap(), "/metrics")?;
                match sample(&body, "paqet_sessions{role=\"server\"}") {
                    Some(v) if v >= 1.0 => Ok(body),
                    _ => Err(std::io::Error::other(format!("no live session in the server's /metrics:\n{body}"))),
                }
            })
        })
        .join()
        .unwrap()
        .expect("netns")
        .unwrap_or_else(|e| panic!("server /metrics: {e}"));
    assert!(sample(&srv, "paqet_guard_drops_total").is_some_and(|v| v > 0.0), "guard drops not counted:\n{srv}");
    assert!(sample(&srv, "paqet_session_opens_total").is_some_and(|v| v >= 1.0), "opens not counted:\n{srv}");

    // 3. Graceful exits remove the rules.
    assert!(client.stop(), "client did not exit on SIGTERM:\n{}", client.log_text());
    assert!(our_rules(&ns_a).is_empty(), "client left rules behind: {:?}", our_rules(&ns_a));
    assert!(server.stop(), "server did not exit on SIGTERM:\n{}", server.log_text());
    assert!(our_rules(&ns_b).is_empty(), "server left rules behind: {:?}", our_rules(&ns_b));
    drop(veth);
}
