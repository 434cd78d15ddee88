//! The XDP data plane end to end (root only; skipped otherwise).
//!
//! Two network namespaces joined by a veth pair (names carry the pid). The XDP daemons run in-process
//! (`worker::daemon::run` with an XDP data plane on a thread inside their namespace, stopped through
//! `daemon::Stop`); pcap
//! peers run the real `paqet-dp run --mode pcap` binary with the iptables rules of spec §2.4 on their
//! side only. The XDP side never gets any iptables rule. The server namespace runs a TCP echo server on
//! loopback; the client forwards 127.0.0.1:FWD to it. Every wait is bounded; `Drop` stops daemons and
//! deletes namespaces. The tests run one at a time (a lock): each one moves 16 MiB each way.
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use paqet::config::Config;
use paqet::ops::hub::MetricsHub;
use paqet::ops::metrics::{DataPathMode, RoleLabel};
use paqet::worker::daemon::{self, DaemonOptions, DataPlane, Outcome, Stop};
use paqet::worker::xdp::XdpWant;
use paqet_common::XdpCounter;
use paqet_testkit::netns::Netns;
use sha2::{Digest, Sha256};

const MIB16: usize = 16 << 20;

/// Client (A) and server (B) namespaces joined by a veth pair with `queues` queues ([`Net::direct_queues`],
/// TX checksum offload off: spike pitfall 10), a TCP echo server on B's loopback, and a temp dir.
struct Topo {
    net: Net,
    echo: SocketAddr,
    dir: TempDir,
}

impl Topo {
    fn new(tag: &str, queues: u32) -> Topo {
        let net = Net::direct_queues(tag, queues);
        let echo = tcp_echo(net.server());
        Topo {
            net,
            echo,
            dir: TempDir::new(tag),
        }
    }

    /// The client namespace.
    fn a(&self) -> &Netns {
        self.net.client()
    }

    /// The server namespace.
    fn b(&self) -> &Netns {
        self.net.server()
    }

    fn server_cfg(&self, guard: bool) -> String {
        format!(
            r#"role = "server"
[listen]
addr = ":{TUNNEL_PORT}"
[network]
interface = "{dev}"
[network.ipv4]
addr = "{ip}:{TUNNEL_PORT}"
router_mac = "{mac}"
[transport]
protocol = "kcp"
{kcp}"#,
            dev = self.net.server_if,
            ip = self.net.server_ip,
            mac = self.net.server_gw_mac,
            kcp = kcp_table(guard),
        )
    }

    /// A client on local port `local_port` (0: any) forwarding 127.0.0.1:`fwd` to the echo server.
    fn client_cfg(&self, local_port: u16, fwd: u16, guard: bool) -> String {
        format!(
            r#"role = "client"
[server]
addr = "{ip_b}:{TUNNEL_PORT}"
[network]
interface = "{dev}"
[network.ipv4]
addr = "{ip_a}:{local_port}"
router_mac = "{mac}"
[transport]
protocol = "kcp"
conn = 1
{kcp}[[forward]]
listen = "127.0.0.1:{fwd}"
target = "{echo}"
protocol = "tcp"
"#,
            ip_b = self.net.server_ip,
            ip_a = self.net.client_ip,
            dev = self.net.client_if,
            mac = self.net.client_gw_mac,
            echo = self.echo,
            kcp = kcp_table(guard),
        )
    }

    /// A `paqet-dp run --mode pcap` child on `toml` in the server namespace (`server`) or the client one.
    /// The iptables rules it needs are the test's to apply ([`Net::apply_firewall`]).
    fn pcap_daemon(&self, server: bool, name: &str, toml: &str) -> Daemon {
        let ns = if server { self.b() } else { self.a() };
        Daemon::spawn(ns, self.dir.path(), name, toml, Mode::Pcap, false)
    }
}

/// The `[transport.kcp]` table of both sides.
fn kcp_table(guard: bool) -> String {
    format!("[transport.kcp]\nmode = \"fast3\"\nsndwnd = 1024\nrcvwnd = 1024\nblock = \"aes\"\nkey = \"{KEY}\"\nguard = {guard}\n")
}

/// The serial lock and a fresh topology, or `None` (after saying why) when `test` must be skipped.
fn setup(test: &str, tag: &str, queues: u32) -> Option<(MutexGuard<'static, ()>, Topo)> {
    if skip(test, &[]) {
        return None;
    }
    if !paqet::io::steer::has_xdp_program() {
        eprintln!(
            "skipped {test}: this build has no XDP program (bpf-linker missing at build time)"
        );
        return None;
    }
    let serial = serial();
    Some((serial, Topo::new(tag, queues)))
}

/// An in-process XDP daemon on a thread inside its namespace; stopped (and joined) on drop.
struct XdpDaemon {
    hub: Arc<MetricsHub>,
    stop: Stop,
    thread: Option<JoinHandle<std::io::Result<anyhow::Result<Outcome>>>>,
}

impl XdpDaemon {
    /// Starts the daemon and waits until its data path is attached ([`wait_attached`](Self::wait_attached)).
    fn attached(ns: &Netns, toml: &str, iface: &str, want: XdpWant) -> XdpDaemon {
        let cfg = Config::from_toml_str(toml).expect("config").config;
        let role = if toml.starts_with("role = \"server\"") {
            RoleLabel::Server
        } else {
            RoleLabel::Client
        };
        let hub = MetricsHub::new(role, DataPathMode::Pcap, 1);
        let stop = Stop::new();
        let opts = DaemonOptions::new(hub.clone())
            .with_pin(false)
            .with_stop(stop.clone());
        let iface = iface.to_owned();
        let thread = ns.spawn(move || daemon::run(&cfg, &iface, DataPlane::Xdp(want), opts));
        let mut d = XdpDaemon {
            hub,
            stop,
            thread: Some(thread),
        };
        d.wait_attached();
        d
    }

    /// Waits until the data path is attached (the program is armed) or the daemon failed.
    fn wait_attached(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        // The control thread publishes the XDP counters once the program is armed and every worker started.
        while self.hub.snapshot().xdp.is_none() {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let r = self.thread.take().unwrap().join().unwrap().expect("netns");
                panic!("XDP daemon ended at start: {:?}", r.err());
            }
            assert!(
                Instant::now() < deadline,
                "XDP daemon did not attach within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self) -> Outcome {
        self.stop.stop();
        let r = self
            .thread
            .take()
            .unwrap()
            .join()
            .expect("daemon thread")
            .expect("netns");
        r.unwrap_or_else(|e| panic!("XDP daemon failed: {e:#}"))
    }
}

impl Drop for XdpDaemon {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `data` on a new connection to `addr` (connect bound `connect`, 90 s I/O bounds) while reading as many
/// bytes back; returns what came back.
fn echo_bytes(addr: SocketAddr, connect: Duration, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let c = TcpStream::connect_timeout(&addr, connect)?;
    c.set_read_timeout(Some(Duration::from_secs(90)))?;
    c.set_write_timeout(Some(Duration::from_secs(90)))?;
    echo_exchange(&c, data)
}

/// Sends `n` bytes through the forward on 127.0.0.1:`fwd` (in `ns`) and checks the echo byte for byte.
fn echo_through(ns: &Netns, fwd: u16, n: usize, seed: u64) {
    let r = in_ns(ns, move || -> std::io::Result<(String, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], fwd));
        // The first exchange proves the tunnel is up (retried while sessions come up).
        retry(Duration::from_secs(30), || {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            c.write_all(b"ping")?;
            let mut b = [0u8; 4];
            c.read_exact(&mut b)?;
            if &b != b"ping" {
                return Err(std::io::Error::other("probe echo differs"));
            }
            Ok(())
        })?;
        let data = pattern_bytes(seed, n);
        let t0 = Instant::now();
        let got = echo_bytes(addr, Duration::from_secs(2), &data)?;
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("{} MiB each way in {secs:.2} s", n >> 20);
        Ok((
            hex::encode(Sha256::digest(&data)),
            hex::encode(Sha256::digest(&got)),
        ))
    });
    let (sent, got) = r.unwrap_or_else(|e| panic!("transfer through the tunnel failed: {e}"));
    assert_eq!(sent, got, "{n} bytes echoed through the tunnel differ");
}

/// One ICMP echo request/reply with `dst` over a raw socket (root), bounded by a 5 s receive timeout.
fn icmp_echo(dst: std::net::Ipv4Addr) -> std::io::Result<()> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let close = scopeguard(fd);
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let id: u16 = std::process::id() as u16;
    let mut req = [
        8u8,
        0,
        0,
        0,
        (id >> 8) as u8,
        id as u8,
        0,
        1,
        b'p',
        b'a',
        b'q',
        b'e',
        b't',
        b'!',
        0,
        0,
    ];
    let mut sum: u32 = req
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    req[2..4].copy_from_slice(&ck.to_be_bytes());
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let n = unsafe {
        libc::sendto(
            fd,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 1500];
    loop {
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        // An echo reply (type 0) from `dst` with our identifier.
        if n >= ihl + 8
            && buf[12..16] == dst.octets()
            && buf[ihl] == 0
            && buf[ihl + 4..ihl + 6] == id.to_be_bytes()
        {
            drop(close);
            return Ok(());
        }
    }
}

/// Closes `fd` when dropped.
fn scopeguard(fd: i32) -> impl Drop {
    struct Close(i32);
    impl Drop for Close {
        fn drop(&mut self) {
            unsafe { libc::close(self.0) };
        }
    }
    Close(fd)
}

fn counter(o: &Outcome, c: XdpCounter) -> u64 {
    o.xdp.expect("an XDP daemon reports the program's counters")[c as usize]
}

/// Both ends XDP in `want` mode: 16 MiB each way; on the server no RST leaves the tunnel port (no iptables
/// rules anywhere); other TCP and ICMP still reach the server's stack.
fn xdp_pair(topo: &Topo, want: XdpWant, expect: DataPathMode) {
    let server = XdpDaemon::attached(topo.b(), &topo.server_cfg(false), &topo.net.server_if, want);
    assert_eq!(server.hub.snapshot().mode, expect);
    let fwd = 18180;
    let client = XdpDaemon::attached(
        topo.a(),
        &topo.client_cfg(0, fwd, false),
        &topo.net.client_if,
        want,
    );
    assert_eq!(client.hub.snapshot().mode, expect);
    let cap = RstCapture::start(
        topo.b(),
        &topo.net.server_if,
        topo.dir.path().join("rst.pcap"),
    );
    echo_through(topo.a(), fwd, MIB16, 0x1234_5678);
    let (_, rsts) = cap.count();
    assert_eq!(rsts, 0, "RSTs left the tunnel port on the XDP server");

    // Other TCP (a listener on the server's address) and ICMP pass to the kernel untouched.
    let ip_b = topo.net.server_ip;
    let other = topo
        .b()
        .spawn(move || {
            let l = TcpListener::bind((ip_b, 0)).unwrap();
            let port = l.local_addr().unwrap().port();
            let t = std::thread::spawn(move || {
                let (mut c, _) = l.accept().unwrap();
                let mut b = [0u8; 5];
                c.read_exact(&mut b).unwrap();
                c.write_all(&b).unwrap();
            });
            (port, t)
        })
        .join()
        .unwrap()
        .unwrap();
    let echoed = topo
        .a()
        .spawn(move || -> std::io::Result<[u8; 5]> {
            let mut c = TcpStream::connect_timeout(
                &format!("{ip_b}:{}", other.0).parse().unwrap(),
                Duration::from_secs(5),
            )?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"hello")?;
            let mut b = [0u8; 5];
            c.read_exact(&mut b)?;
            Ok(b)
        })
        .join()
        .unwrap()
        .unwrap()
        .expect("TCP to another port while the tunnel runs");
    assert_eq!(&echoed, b"hello");
    other.1.join().unwrap();
    topo.a()
        .spawn(move || icmp_echo(ip_b))
        .join()
        .unwrap()
        .unwrap()
        .expect("ICMP to the server while the tunnel runs");

    let c = client.finish();
    let s = server.finish();
    assert!(
        counter(&s, XdpCounter::Steered) > 10_000,
        "server steered {:?}",
        s.xdp
    );
    assert!(
        counter(&c, XdpCounter::Steered) > 10_000,
        "client steered {:?}",
        c.xdp
    );
    assert!(
        counter(&s, XdpCounter::Passed) > 0,
        "the other TCP and ICMP passed"
    );
    assert_eq!(
        s.snapshots[0].session_opens, 1,
        "server worker: {:?}",
        s.snapshots[0]
    );
}

#[test]
fn native_pair_moves_16_mib_each_way_without_rsts() {
    let Some((_serial, topo)) = setup("native_pair_moves_16_mib_each_way_without_rsts", "xn", 1)
    else {
        return;
    };
    xdp_pair(&topo, XdpWant::Native, DataPathMode::XdpNative);
}

#[test]
fn generic_pair_moves_16_mib_each_way_without_rsts() {
    let Some((_serial, topo)) = setup("generic_pair_moves_16_mib_each_way_without_rsts", "xg", 1)
    else {
        return;
    };
    xdp_pair(&topo, XdpWant::Generic, DataPathMode::XdpGeneric);
}

/// An XDP daemon (`want`) on one side and the pcap binary (with its iptables rules) on the other, the XDP
/// one on the server side when `xdp_server`: 16 MiB each way, steered by the XDP side's program.
fn mixed_pair(topo: &Topo, xdp_server: bool, want: XdpWant, fwd: u16, seed: u64) {
    let (xdp, _pcap) = if xdp_server {
        let xdp = XdpDaemon::attached(topo.b(), &topo.server_cfg(false), &topo.net.server_if, want);
        topo.net.apply_firewall(false, true);
        (
            xdp,
            topo.pcap_daemon(false, "client", &topo.client_cfg(0, fwd, false)),
        )
    } else {
        topo.net.apply_firewall(true, false);
        let pcap = topo.pcap_daemon(true, "server", &topo.server_cfg(false));
        (
            XdpDaemon::attached(
                topo.a(),
                &topo.client_cfg(0, fwd, false),
                &topo.net.client_if,
                want,
            ),
            pcap,
        )
    };
    echo_through(topo.a(), fwd, MIB16, seed);
    let o = xdp.finish();
    assert!(counter(&o, XdpCounter::Steered) > 10_000, "{:?}", o.xdp);
}

#[test]
fn xdp_server_with_pcap_client() {
    let Some((_serial, topo)) = setup("xdp_server_with_pcap_client", "xs", 1) else {
        return;
    };
    mixed_pair(&topo, true, XdpWant::Auto, 18181, 0x0bad_cafe);
}

#[test]
fn pcap_server_with_xdp_client() {
    let Some((_serial, topo)) = setup("pcap_server_with_xdp_client", "xc", 1) else {
        return;
    };
    mixed_pair(&topo, false, XdpWant::Generic, 18182, 0x5eed_0001);
}

#[test]
fn two_queues_spread_sessions_over_both_workers() {
    let Some((_serial, topo)) = setup("two_queues_spread_sessions_over_both_workers", "xq", 2)
    else {
        return;
    };
    let server = XdpDaemon::attached(
        topo.b(),
        &topo.server_cfg(false),
        &topo.net.server_if,
        XdpWant::Native,
    );
    // Two pcap clients on consecutive local ports: the server's owner hash puts them on different workers.
    let (f1, f2) = (18183, 18184);
    topo.net.apply_firewall(false, true);
    let _c1 = topo.pcap_daemon(false, "client1", &topo.client_cfg(40000, f1, false));
    let _c2 = topo.pcap_daemon(false, "client2", &topo.client_cfg(40001, f2, false));
    std::thread::scope(|sc| {
        let t1 = sc.spawn(|| echo_through(topo.a(), f1, 8 << 20, 11));
        echo_through(topo.a(), f2, 8 << 20, 22);
        t1.join().expect("first client transfer");
    });
    let s = server.finish();
    assert_eq!(s.workers, 2);
    // Each worker owns (and transmits for) its session; a worker's frames may arrive on either queue
    // (veth picks the queue by sending CPU), the other worker then hands them over, so only the sum of
    // the sockets' RX counts is fixed.
    for (i, w) in s.snapshots.iter().enumerate().take(2) {
        assert!(
            w.session_opens > 0 && w.tx_packets > 1000,
            "worker {i} served no session: {w:?}"
        );
    }
    let rx: u64 = s.snapshots.iter().map(|w| w.rx_packets).sum();
    assert!(rx > 1000, "the queue sockets received {rx} frames");
}

#[test]
fn guard_flood_is_dropped_in_xdp() {
    let Some((_serial, topo)) = setup("guard_flood_is_dropped_in_xdp", "xf", 1) else {
        return;
    };
    let server = XdpDaemon::attached(
        topo.b(),
        &topo.server_cfg(true),
        &topo.net.server_if,
        XdpWant::Native,
    );
    let fwd = 18185;
    let client = XdpDaemon::attached(
        topo.a(),
        &topo.client_cfg(0, fwd, true),
        &topo.net.client_if,
        XdpWant::Native,
    );
    echo_through(topo.a(), fwd, 1 << 20, 7);
    let client_out = client.finish();
    assert!(counter(&client_out, XdpCounter::Steered) > 0);
    // Wait for a snapshot taken after the client stopped: the worker's rx count then stays put.
    std::thread::sleep(Duration::from_millis(1200));
    let rx_before: u64 = server
        .hub
        .snapshot()
        .workers
        .iter()
        .map(|w| w.rx_packets)
        .sum();

    // Flood: 20 000 frames to the tunnel port with payloads that carry no valid guard cookie.
    const FLOOD: u64 = 20_000;
    let (dev, src, dst) = (
        topo.net.client_if.clone(),
        topo.net.client_ip,
        topo.net.server_ip,
    );
    // The client's own MAC (next hop of the server) and the server's.
    let (mac_a, mac_b) = (
        topo.net.server_gw_mac.clone(),
        topo.net.client_gw_mac.clone(),
    );
    topo.a()
        .spawn(move || {
            use paqet::io::pcap::{PcapConfig, PcapIo};
            use paqet::io::PacketIo;
            use paqet::wire::envelope::{EnvelopeBuilder, TcpFlags};
            let mac = |s: &str| -> [u8; 6] {
                let v: Vec<u8> = s
                    .split(':')
                    .map(|h| u8::from_str_radix(h, 16).unwrap())
                    .collect();
                v.try_into().unwrap()
            };
            let mut io = PcapIo::open(PcapConfig::new(dev, 45000)).expect("pcap injector");
            let mut env = EnvelopeBuilder::new(
                mac(&mac_a),
                mac(&mac_b),
                format!("{src}:45000").parse().unwrap(),
                format!("{dst}:{TUNNEL_PORT}").parse().unwrap(),
                1,
            )
            .unwrap();
            let flags = TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0);
            let body = pattern_bytes(99, 200);
            for i in 0..FLOOD {
                let hl = env.header_len(flags);
                let total = hl + body.len();
                io.send_with(total, &mut |buf: &mut [u8]| {
                    buf[hl..total].copy_from_slice(&body);
                    buf[hl..hl + 8].copy_from_slice(&i.to_be_bytes());
                    env.emit(flags, body.len(), &mut buf[..total]).unwrap_or(0)
                })
                .expect("inject");
            }
            io.flush().expect("flush");
        })
        .join()
        .unwrap()
        .unwrap();
    // Bounded wait for the control thread's next counters publication.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dropped = server
            .hub
            .snapshot()
            .xdp
            .map(|c| c[XdpCounter::GuardDropped as usize])
            .unwrap_or(0);
        if dropped >= FLOOD {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guard_dropped = {dropped}, expected ≥ {FLOOD}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = server.finish();
    let rx_after: u64 = s.snapshots.iter().map(|w| w.rx_packets).sum();
    assert!(
        rx_after - rx_before < 100,
        "the worker received {} frames of the flood (before {rx_before}, after {rx_after})",
        rx_after - rx_before
    );
    assert!(counter(&s, XdpCounter::GuardDropped) >= FLOOD);
}

/// Runs `conns` concurrent connections through the forward on 127.0.0.1:`fwd` (in `ns`), `n` bytes each way
/// on each, and checks every echo byte for byte. The forward's listeners are `SO_REUSEPORT` sockets of the
/// session-running workers, so the connections spread over them; each worker opens its streams on its
/// sessions round-robin.
fn parallel_echo(ns: &Netns, fwd: u16, conns: usize, n: usize) {
    let r = ns
        .spawn(move || -> std::io::Result<Vec<(usize, bool)>> {
            let addr: SocketAddr = format!("127.0.0.1:{fwd}").parse().unwrap();
            let mut threads = Vec::new();
            for k in 0..conns {
                threads.push(std::thread::spawn(
                    move || -> std::io::Result<(usize, bool)> {
                        let data = pattern_bytes(0x7700 + k as u64, n);
                        let got = echo_bytes(addr, Duration::from_secs(5), &data)?;
                        Ok((k, Sha256::digest(&data) == Sha256::digest(&got)))
                    },
                ));
            }
            threads
                .into_iter()
                .map(|t| t.join().expect("connection thread"))
                .collect()
        })
        .join()
        .expect("client thread")
        .expect("netns");
    let results =
        r.unwrap_or_else(|e| panic!("a parallel transfer through the tunnel failed: {e}"));
    assert_eq!(results.len(), conns);
    for (k, same) in results {
        assert!(
            same,
            "connection {k}: {n} bytes echoed through the tunnel differ"
        );
    }
}

/// Captures (headers only) the tunnel frames a client at `client_ip` sends to the server port on `dev` in `ns`.
fn tunnel_capture(ns: &Netns, dev: &str, file: std::path::PathBuf, client_ip: Ipv4Addr) -> Tcpdump {
    Tcpdump::start(
        ns,
        dev,
        file,
        &["-s", "96"],
        &format!("tcp and src host {client_ip} and dst port {TUNNEL_PORT}"),
    )
}

/// Stops `cap` (from [`tunnel_capture`]); returns the number of frames per client source port.
fn frames_per_port(cap: Tcpdump, client_ip: Ipv4Addr) -> BTreeMap<u16, usize> {
    let prefix = format!("{client_ip}.");
    let mut per_port = BTreeMap::new();
    for line in cap.finish().lines() {
        // "12:00:00.000000 IP 10.215.9.1.40001 > 10.215.9.2.9999: Flags [P.], ..."
        let Some(src) = line.split_whitespace().find(|w| w.starts_with(&prefix)) else {
            continue;
        };
        if let Ok(port) = src[prefix.len()..].parse::<u16>() {
            *per_port.entry(port).or_insert(0) += 1;
        }
    }
    per_port
}

/// An XDP client with `transport.conn = 4` on a 2-queue veth: all four sessions come up on four local ports,
/// two per worker (port % 2 = worker), and carry data: 24 parallel connections of 1 MiB each way, byte-exact.
/// The server is the pcap binary, so a capture on its side sees every frame the client sends and can tell
/// the sessions apart by their source ports.
#[test]
fn xdp_client_runs_all_conn_sessions_over_both_workers() {
    let Some((_serial, topo)) = setup(
        "xdp_client_runs_all_conn_sessions_over_both_workers",
        "xm",
        2,
    ) else {
        return;
    };
    topo.net.apply_firewall(true, false);
    let _server = topo.pcap_daemon(true, "server", &topo.server_cfg(false));
    let fwd = 18186;
    let cfg = topo
        .client_cfg(0, fwd, false)
        .replace("conn = 1\n", "conn = 4\n");
    assert!(cfg.contains("conn = 4\n"));
    let client = XdpDaemon::attached(topo.a(), &cfg, &topo.net.client_if, XdpWant::Native);
    // The tunnel is up (one small exchange), then the capture runs over the parallel transfer.
    echo_through(topo.a(), fwd, 4096, 3);
    let cap = tunnel_capture(
        topo.b(),
        &topo.net.server_if,
        topo.dir.path().join("tunnel.pcap"),
        topo.net.client_ip,
    );
    const CONNS: usize = 24;
    parallel_echo(topo.a(), fwd, CONNS, 1 << 20);
    let per_port = frames_per_port(cap, topo.net.client_ip);
    // The final snapshots are taken when the daemon stops, sessions still up.
    let c = client.finish();
    let live: Vec<u64> = c.snapshots.iter().map(|w| w.sessions).collect();
    eprintln!("client frames per source port: {per_port:?}");
    for (i, w) in c.snapshots.iter().enumerate() {
        eprintln!(
            "client worker {i}: handed {} dropped {}",
            w.rx_cross_worker, w.rx_handoff_drops
        );
    }

    assert_eq!(c.workers, 2);
    assert_eq!(live, vec![2, 2], "live sessions per client worker");
    for (i, w) in c.snapshots.iter().enumerate() {
        assert!(
            w.session_opens >= 2 && w.tx_packets > 1000,
            "client worker {i} ran no sessions: {w:?}"
        );
    }
    // Four sessions, four local ports, two owned by each worker; each carried at least one 1 MiB stream
    // (about 800 full frames), far above what an idle session sends (acks, keepalives).
    let busy: Vec<(u16, usize)> = per_port
        .iter()
        .filter(|(_, n)| **n > 500)
        .map(|(p, n)| (*p, *n))
        .collect();
    assert_eq!(busy.len(), 4, "frames per client source port: {per_port:?}");
    for w in 0..2u16 {
        assert_eq!(
            busy.iter().filter(|(p, _)| p % 2 == w).count(),
            2,
            "ports of worker {w}: {per_port:?}"
        );
    }
    assert!(
        counter(&c, XdpCounter::Steered) > 10_000,
        "client steered {:?}",
        c.xdp
    );
    assert_eq!(counter(&c, XdpCounter::GuardDropped), 0);
}

/// Both ends XDP on 2-queue veths with the guard on: the client's four sessions (two per worker) reach the
/// server's two workers and carry parallel transfers byte-exact; the client-side steering (frames from the
/// server endpoint to the client's session ports) passes the guard check in the program.
#[test]
fn xdp_pair_with_conn_4_and_guard_on_two_queues() {
    let Some((_serial, topo)) = setup("xdp_pair_with_conn_4_and_guard_on_two_queues", "xk", 2)
    else {
        return;
    };
    let server = XdpDaemon::attached(
        topo.b(),
        &topo.server_cfg(true),
        &topo.net.server_if,
        XdpWant::Native,
    );
    let fwd = 18187;
    let cfg = topo
        .client_cfg(0, fwd, true)
        .replace("conn = 1\n", "conn = 4\n");
    let client = XdpDaemon::attached(topo.a(), &cfg, &topo.net.client_if, XdpWant::Native);
    echo_through(topo.a(), fwd, 4096, 5);
    parallel_echo(topo.a(), fwd, 8, 1 << 20);
    // The final snapshots are taken when the daemons stop, sessions still up.
    let c = client.finish();
    let s = server.finish();
    let client_live: Vec<u64> = c.snapshots.iter().map(|w| w.sessions).collect();
    let server_live: u64 = s.snapshots.iter().map(|w| w.sessions).sum();
    assert_eq!(client_live, vec![2, 2], "live sessions per client worker");
    assert_eq!(server_live, 4, "live sessions on the server");
    let opened: u64 = s.snapshots.iter().map(|w| w.session_opens).sum();
    assert!(
        opened >= 4,
        "server opened {opened} sessions: {:?}",
        s.snapshots
    );
    assert_eq!(
        counter(&c, XdpCounter::GuardDropped),
        0,
        "valid frames dropped by the client's guard"
    );
    assert_eq!(
        counter(&s, XdpCounter::GuardDropped),
        0,
        "valid frames dropped by the server's guard"
    );
    assert!(
        counter(&c, XdpCounter::Steered) > 5_000,
        "client steered {:?}",
        c.xdp
    );
}

/// `Cpus_allowed_list` of every `paqet-xdp-N` worker thread of process `pid`, by thread name.
fn worker_cpu_lists(pid: u32) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("paqet-xdp-") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.insert(comm.to_owned(), l.trim().to_owned());
        }
    }
    out
}

/// `io.cpus` places the workers of the real binary: a listed CPU pins both workers of a two-queue veth there
/// (wrapping), `none` leaves them on the whole process mask, and a CPU outside the mask stops the start with
/// an error naming the key.
#[test]
fn io_cpus_places_the_workers_of_the_binary() {
    let Some((_serial, topo)) = setup("io_cpus_places_the_workers_of_the_binary", "xc", 2) else {
        return;
    };
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let mask = own
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned();
    let last = *paqet::worker::daemon::allowed_cpus().last().unwrap();
    for (i, (cpus, want)) in [
        (last.to_string(), last.to_string()),
        ("none".to_string(), mask.clone()),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = format!("{}[io]\ncpus = \"{cpus}\"\n", topo.server_cfg(false));
        let mut d = Daemon::spawn(
            topo.b(),
            topo.dir.path(),
            &format!("server-cpus-{i}"),
            &cfg,
            Mode::XdpNative,
            false,
        );
        let lists = poll(Duration::from_secs(30), || {
            d.assert_running();
            let m = worker_cpu_lists(d.pid());
            (m.len() == 2).then_some(m)
        })
        .unwrap_or_else(|| {
            panic!(
                "io.cpus = {cpus:?}: no two XDP workers within 30 s:\n{}",
                d.log_text()
            )
        });
        for (name, list) in &lists {
            assert_eq!(
                list, &want,
                "io.cpus = {cpus:?}: {name} may run on CPUs {list}"
            );
        }
        d.stop();
    }
    let cfg = format!("{}[io]\ncpus = \"1023\"\n", topo.server_cfg(false));
    let mut d = Daemon::spawn(
        topo.b(),
        topo.dir.path(),
        "server-cpus-bad",
        &cfg,
        Mode::XdpNative,
        false,
    );
    let exited = poll(Duration::from_secs(30), || (!d.running()).then_some(()));
    let log = d.log_text();
    assert!(
        exited.is_some(),
        "a daemon pinned to CPU 1023 kept running:\n{log}"
    );
    assert!(
        log.contains("io.cpus = \"1023\": CPU 1023 is not available to this process"),
        "the start-up error does not name io.cpus:\n{log}"
    );
}
