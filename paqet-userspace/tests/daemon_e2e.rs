//! End to end through the real binary on the pcap path (root only; skipped otherwise).
//!
//! Two network namespaces joined by a veth pair; the server namespace runs a TCP echo and a UDP echo
//! server on loopback; `paqet-dp run` runs as server in B and as client in A with a TCP and a UDP port
//! forward, with the iptables NOTRACK / RST-drop rules (spec §2.4) applied in each namespace. 16 MiB go
//! through the TCP forward and come back (sha256 compared for both directions), and a UDP datagram makes
//! the round trip through the UDP forward. Every wait is bounded; children are killed in `Drop`.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use paqet::io::netns::{is_root, Netns, VethPair};
use sha2::{Digest, Sha256};

const PORT: u16 = 9999;
const KEY: &str = "paqet-dp-e2e-test-key";

/// A `paqet-dp run` child, killed (and its log printed on failure) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
    name: &'static str,
}

impl Daemon {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first (graceful path), then make sure.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ({}) ----\n{}", self.name, self.log.display(), self.log_text());
        }
    }
}

/// Temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_daemon(ns: &Netns, dir: &TempDir, name: &'static str, config: &str) -> Daemon {
    let cfg = dir.0.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = dir.0.join(format!("{name}.log"));
    let logf = std::fs::File::create(&log).unwrap();
    let child = ns
        .command(env!("CARGO_BIN_EXE_paqet-dp"))
        .args(["run", "-c", cfg.to_str().unwrap(), "--mode", "pcap"])
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn paqet-dp");
    Daemon { child, log, name }
}

fn firewall(ns: &Netns, rules: &[&str]) {
    for r in rules {
        let args: Vec<&str> = r.split_whitespace().collect();
        ns.exec(&args).unwrap_or_else(|e| panic!("{r}: {e}"));
    }
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
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

#[test]
fn tcp_and_udp_forwards_through_two_daemons() {
    if !is_root() {
        eprintln!("skipped: daemon_e2e needs root (network namespaces, pcap, iptables)");
        return;
    }
    let pid = std::process::id();
    let k = pid % 250 + 1;
    let (ip_a, ip_b) = (format!("10.214.{k}.1"), format!("10.214.{k}.2"));
    let (mac_a, mac_b) = ("02:00:00:e2:e0:01", "02:00:00:e2:e0:02");
    let ns_a = Netns::new("ea").expect("netns a");
    let ns_b = Netns::new("eb").expect("netns b");
    let (dev_a, dev_b) = (format!("pe{pid}a"), format!("pe{pid}b"));
    let veth = VethPair::new(&dev_a, &dev_b, &ns_a, &ns_b).expect("veth");
    ns_a.exec(&["ip", "link", "set", &dev_a, "address", mac_a]).unwrap();
    ns_b.exec(&["ip", "link", "set", &dev_b, "address", mac_b]).unwrap();
    veth.configure(&ns_a, &ns_b, &format!("{ip_a}/24"), &format!("{ip_b}/24"), true).expect("addresses");
    let port = PORT.to_string();
    firewall(
        &ns_b,
        &[
            &format!("iptables -t raw -A PREROUTING -p tcp --dport {port} -j NOTRACK"),
            &format!("iptables -t raw -A OUTPUT -p tcp --sport {port} -j NOTRACK"),
            &format!("iptables -t mangle -A OUTPUT -p tcp --sport {port} --tcp-flags RST RST -j DROP"),
        ],
    );
    firewall(
        &ns_a,
        &[
            &format!("iptables -t raw -A PREROUTING -p tcp -s {ip_b} --sport {port} -j NOTRACK"),
            &format!("iptables -t raw -A OUTPUT -p tcp -d {ip_b} --dport {port} -j NOTRACK"),
            &format!("iptables -t mangle -A OUTPUT -p tcp -d {ip_b} --dport {port} --tcp-flags RST RST -j DROP"),
        ],
    );

    // Echo servers on the server side's loopback (threads inside namespace B; they die with the process).
    let (tcp_echo, udp_echo) = ns_b
        .spawn(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let u = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addrs = (l.local_addr().unwrap(), u.local_addr().unwrap());
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(mut c) = c else { return };
                    std::thread::spawn(move || {
                        let mut w = c.try_clone().unwrap();
                        let _ = std::io::copy(&mut c, &mut w);
                    });
                }
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok((n, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], from);
                }
            });
            addrs
        })
        .join()
        .unwrap()
        .expect("echo servers");

    let dir = TempDir(std::env::temp_dir().join(format!("paqet-e2e-{pid}")));
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
sndwnd = 1024
rcvwnd = 1024
block = "aes"
key = "{KEY}"
smuxkalive = 1
smuxktimeout = 2
"#
    );
    let (fwd_tcp, fwd_udp) = (18080u16, 18081u16);
    let client_cfg = format!(
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
conn = 2
[transport.kcp]
mode = "fast3"
sndwnd = 1024
rcvwnd = 1024
block = "aes"
key = "{KEY}"
smuxkalive = 1
smuxktimeout = 2
[[forward]]
listen = "127.0.0.1:{fwd_tcp}"
target = "127.0.0.1:{tcp_port}"
protocol = "tcp"
[[forward]]
listen = "127.0.0.1:{fwd_udp}"
target = "127.0.0.1:{udp_port}"
protocol = "udp"
"#,
        tcp_port = tcp_echo.port(),
        udp_port = udp_echo.port(),
    );
    let server = spawn_daemon(&ns_b, &dir, "server", &server_cfg);
    let client = spawn_daemon(&ns_a, &dir, "client", &client_cfg);

    let result = ns_a
        .spawn(move || -> std::io::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
            // TCP: 16 MiB out and back, concurrently.
            let fwd: SocketAddr = format!("127.0.0.1:{fwd_tcp}").parse().unwrap();
            let mut c = retry(Duration::from_secs(20), || TcpStream::connect_timeout(&fwd, Duration::from_secs(2)))?;
            c.set_read_timeout(Some(Duration::from_secs(60)))?;
            c.set_write_timeout(Some(Duration::from_secs(60)))?;
            let data = pattern(16 << 20);
            let t0 = Instant::now();
            let mut w = c.try_clone()?;
            let to_send = data.clone();
            let writer = std::thread::spawn(move || w.write_all(&to_send));
            let mut got = vec![0u8; data.len()];
            c.read_exact(&mut got)?;
            writer.join().expect("writer thread")?;
            let secs = t0.elapsed().as_secs_f64();
            eprintln!("16 MiB each way in {secs:.2} s ({:.1} MB/s per direction)", 16.0 * 1.048576 / secs);
            // UDP: one request/response through the UDP forward.
            let u = UdpSocket::bind("127.0.0.1:0")?;
            u.set_read_timeout(Some(Duration::from_secs(2)))?;
            let probe = b"paqet-udp-probe-0001".to_vec();
            let reply = retry(Duration::from_secs(20), || {
                u.send_to(&probe, ("127.0.0.1", fwd_udp))?;
                let mut buf = [0u8; 4096];
                let (n, _) = u.recv_from(&mut buf)?;
                Ok(buf[..n].to_vec())
            })?;
            Ok((data, got, reply))
        })
        .join()
        .expect("client thread")
        .expect("enter netns");
    let (sent, got, reply) = match result {
        Ok(x) => x,
        Err(e) => panic!("traffic through the tunnel failed: {e}"),
    };
    assert_eq!(got.len(), sent.len());
    assert_eq!(
        hex::encode(Sha256::digest(&got)),
        hex::encode(Sha256::digest(&sent)),
        "16 MiB echoed through the TCP forward differ"
    );
    assert_eq!(reply, b"paqet-udp-probe-0001", "UDP echo through the UDP forward");
    // Both daemons are still running (no crash on the way) and logged their sessions.
    let mut server = server;
    let mut client = client;
    assert!(server.child.try_wait().unwrap().is_none(), "server exited:\n{}", server.log_text());
    assert!(client.child.try_wait().unwrap().is_none(), "client exited:\n{}", client.log_text());
    assert!(client.log_text().contains("session dialled"), "client log:\n{}", client.log_text());
    assert!(server.log_text().contains("new session"), "server log:\n{}", server.log_text());

    // The server is stopped and started again: the client notices its sessions died (smux keepalive),
    // re-dials by itself, and new connections work again.
    drop(server);
    let server = spawn_daemon(&ns_b, &dir, "server2", &server_cfg);
    let recovered = ns_a
        .spawn(move || -> std::io::Result<usize> {
            let fwd: SocketAddr = format!("127.0.0.1:{fwd_tcp}").parse().unwrap();
            let data = pattern(64 << 10);
            let mut attempts = 0;
            retry(Duration::from_secs(90), || {
                attempts += 1;
                let mut c = TcpStream::connect_timeout(&fwd, Duration::from_secs(2))?;
                c.set_read_timeout(Some(Duration::from_secs(3)))?;
                c.set_write_timeout(Some(Duration::from_secs(3)))?;
                c.write_all(&data)?;
                let mut got = vec![0u8; data.len()];
                c.read_exact(&mut got)?;
                if got != data {
                    return Err(std::io::Error::other("echo differs"));
                }
                Ok(attempts)
            })
        })
        .join()
        .expect("client thread")
        .expect("enter netns");
    match recovered {
        Ok(n) => eprintln!("recovered after {n} attempt(s)"),
        Err(e) => panic!(
            "no working connection after the server restart: {e}\n--- client log ---\n{}\n--- server2 log ---\n{}",
            client.log_text(),
            server.log_text()
        ),
    }
    assert!(client.child.try_wait().unwrap().is_none(), "client exited:\n{}", client.log_text());
    drop(client);
    drop(server);
    drop(veth);
}
