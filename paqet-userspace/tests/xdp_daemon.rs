//! The XDP data plane end to end (root only; skipped otherwise).
//!
//! Two network namespaces joined by a veth pair (names carry the pid). The XDP daemons run in-process
//! (`worker::xdp::run_xdp_daemon` on a thread inside their namespace, stopped through `XdpStop`); pcap
//! peers run the real `paqet-dp run --mode pcap` binary with the iptables rules of spec §2.4 on their
//! side only. The XDP side never gets any iptables rule. The server namespace runs a TCP echo server on
//! loopback; the client forwards 127.0.0.1:FWD to it. Every wait is bounded; `Drop` stops daemons and
//! deletes namespaces. The tests run one at a time (a lock): each one moves 16 MiB each way.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use paqet::config::Config;
use paqet::io::netns::{is_root, Netns, VethPair};
use paqet::ops::hub::MetricsHub;
use paqet::ops::metrics::{DataPathMode, RoleLabel};
use paqet::worker::xdp::{run_xdp_daemon, XdpOptions, XdpOutcome, XdpStop, XdpWant};
use paqet_common::XdpCounter;
use sha2::{Digest, Sha256};

const PORT: u16 = 9999;
const KEY: &str = "paqet-dp-xdp-test-key";
const MIB16: usize = 16 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: xdp_daemon needs root (network namespaces, XDP, AF_XDP)");
        return true;
    }
    if !paqet::io::steer::has_xdp_program() {
        eprintln!("skipped: this build has no XDP program (bpf-linker missing at build time)");
        return true;
    }
    false
}

/// Two namespaces and a veth pair with fixed MACs and addresses; checksum offload off (spike pitfall 10).
struct Topo {
    a: Netns,
    b: Netns,
    dev_a: String,
    dev_b: String,
    ip_a: String,
    ip_b: String,
    mac_a: &'static str,
    mac_b: &'static str,
    dir: PathBuf,
    _veth: VethPair,
}

impl Topo {
    fn new(tag: char, queues: u32) -> Topo {
        let pid = std::process::id();
        let k = (pid % 200) as u8 + (tag as u8 % 50);
        let (ip_a, ip_b) = (format!("10.215.{k}.1"), format!("10.215.{k}.2"));
        let (mac_a, mac_b) = ("02:00:00:e3:e0:01", "02:00:00:e3:e0:02");
        let a = Netns::new(&format!("x{tag}a")).expect("netns a");
        let b = Netns::new(&format!("x{tag}b")).expect("netns b");
        let (dev_a, dev_b) = (format!("px{pid}{tag}a"), format!("px{pid}{tag}b"));
        let veth = VethPair::new(&dev_a, &dev_b, &a, &b).expect("veth");
        a.exec(&["ip", "link", "set", &dev_a, "address", mac_a]).unwrap();
        b.exec(&["ip", "link", "set", &dev_b, "address", mac_b]).unwrap();
        if queues > 1 {
            let q = queues.to_string();
            for (ns, dev) in [(&a, &dev_a), (&b, &dev_b)] {
                ns.exec(&["ethtool", "-L", dev, "rx", &q, "tx", &q]).expect("ethtool -L");
            }
        }
        veth.configure(&a, &b, &format!("{ip_a}/24"), &format!("{ip_b}/24"), true).expect("addresses");
        for (ns, dev) in [(&a, &dev_a), (&b, &dev_b)] {
            let _ = ns.exec(&["ethtool", "-K", dev, "tx", "off"]);
        }
        let dir = std::env::temp_dir().join(format!("paqet-xdp-{pid}-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        Topo { a, b, dev_a, dev_b, ip_a, ip_b, mac_a, mac_b, dir, _veth: veth }
    }

    fn server_cfg(&self, guard: bool) -> String {
        format!(
            r#"role = "server"
[listen]
addr = ":{PORT}"
[network]
interface = "{dev}"
[network.ipv4]
addr = "{ip}:{PORT}"
router_mac = "{mac}"
[transport]
protocol = "kcp"
[transport.kcp]
mode = "fast3"
sndwnd = 1024
rcvwnd = 1024
block = "aes"
key = "{KEY}"
guard = {guard}
"#,
            dev = self.dev_b,
            ip = self.ip_b,
            mac = self.mac_a,
        )
    }

    fn client_cfg(&self, local_port: u16, fwd: u16, echo: SocketAddr, guard: bool) -> String {
        format!(
            r#"role = "client"
[server]
addr = "{ip_b}:{PORT}"
[network]
interface = "{dev}"
[network.ipv4]
addr = "{ip_a}:{local_port}"
router_mac = "{mac}"
[transport]
protocol = "kcp"
conn = 1
[transport.kcp]
mode = "fast3"
sndwnd = 1024
rcvwnd = 1024
block = "aes"
key = "{KEY}"
guard = {guard}
[[forward]]
listen = "127.0.0.1:{fwd}"
target = "127.0.0.1:{echo_port}"
protocol = "tcp"
"#,
            ip_b = self.ip_b,
            ip_a = self.ip_a,
            dev = self.dev_a,
            mac = self.mac_b,
            echo_port = echo.port(),
        )
    }

    /// A TCP echo server on the server namespace's loopback.
    fn echo(&self) -> SocketAddr {
        self.b
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
            .expect("echo server")
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An in-process XDP daemon on a thread inside its namespace; stopped (and joined) on drop.
struct XdpDaemon {
    hub: Arc<MetricsHub>,
    stop: XdpStop,
    thread: Option<JoinHandle<std::io::Result<anyhow::Result<XdpOutcome>>>>,
}

impl XdpDaemon {
    fn start(ns: &Netns, toml: &str, iface: &str, want: XdpWant) -> XdpDaemon {
        let cfg = Config::from_toml_str(toml).expect("config").config;
        let role = if toml.starts_with("role = \"server\"") { RoleLabel::Server } else { RoleLabel::Client };
        let hub = MetricsHub::new(role, DataPathMode::Pcap, 1);
        let stop = XdpStop::new();
        let opts = XdpOptions { want, front: true, pin: false, stop: stop.clone() };
        let (h, iface) = (hub.clone(), iface.to_owned());
        let thread = ns.spawn(move || run_xdp_daemon(&cfg, &iface, h, opts));
        XdpDaemon { hub, stop, thread: Some(thread) }
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
            assert!(Instant::now() < deadline, "XDP daemon did not attach within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self) -> XdpOutcome {
        self.stop.stop();
        let r = self.thread.take().unwrap().join().expect("daemon thread").expect("netns");
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

/// A `paqet-dp run --mode pcap` child with its iptables rules; killed on drop.
struct PcapDaemon {
    child: Child,
    log: PathBuf,
}

impl PcapDaemon {
    fn start(ns: &Netns, topo: &Topo, name: &str, toml: &str, rules: &[String]) -> PcapDaemon {
        for r in rules {
            let args: Vec<&str> = r.split_whitespace().collect();
            ns.exec(&args).unwrap_or_else(|e| panic!("{r}: {e}"));
        }
        let cfg = topo.dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let log = topo.dir.join(format!("{name}.log"));
        let child = ns
            .command(env!("CARGO_BIN_EXE_paqet-dp"))
            .args(["run", "-c", cfg.to_str().unwrap(), "--mode", "pcap"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn paqet-dp");
        PcapDaemon { child, log }
    }
}

impl Drop for PcapDaemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- pcap daemon log ----\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn server_rules(port: u16) -> Vec<String> {
    vec![
        format!("iptables -t raw -A PREROUTING -p tcp --dport {port} -j NOTRACK"),
        format!("iptables -t raw -A OUTPUT -p tcp --sport {port} -j NOTRACK"),
        format!("iptables -t mangle -A OUTPUT -p tcp --sport {port} --tcp-flags RST RST -j DROP"),
    ]
}

fn client_rules(server_ip: &str, port: u16) -> Vec<String> {
    vec![
        format!("iptables -t raw -A PREROUTING -p tcp -s {server_ip} --sport {port} -j NOTRACK"),
        format!("iptables -t raw -A OUTPUT -p tcp -d {server_ip} --dport {port} -j NOTRACK"),
        format!("iptables -t mangle -A OUTPUT -p tcp -d {server_ip} --dport {port} --tcp-flags RST RST -j DROP"),
    ]
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x: u32 = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

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

/// Sends `n` bytes through the forward on 127.0.0.1:`fwd` (in `ns`) and checks the echo byte for byte.
fn echo_through(ns: &Netns, fwd: u16, n: usize, seed: u32) {
    let r = ns
        .spawn(move || -> std::io::Result<(String, String)> {
            let addr: SocketAddr = format!("127.0.0.1:{fwd}").parse().unwrap();
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
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(90)))?;
            c.set_write_timeout(Some(Duration::from_secs(90)))?;
            let data = pattern(n, seed);
            let t0 = Instant::now();
            let mut w = c.try_clone()?;
            let out = data.clone();
            let writer = std::thread::spawn(move || w.write_all(&out));
            let mut got = vec![0u8; n];
            c.read_exact(&mut got)?;
            writer.join().expect("writer")?;
            let secs = t0.elapsed().as_secs_f64();
            eprintln!("{} MiB each way in {secs:.2} s", n >> 20);
            Ok((hex::encode(Sha256::digest(&data)), hex::encode(Sha256::digest(&got))))
        })
        .join()
        .expect("client thread")
        .expect("netns");
    let (sent, got) = r.unwrap_or_else(|e| panic!("transfer through the tunnel failed: {e}"));
    assert_eq!(sent, got, "{n} bytes echoed through the tunnel differ");
}

/// A `tcpdump` capturing RSTs sent from the tunnel port on `dev` in `ns`.
struct RstCapture {
    child: Child,
    file: PathBuf,
}

impl RstCapture {
    fn start(ns: &Netns, dev: &str, file: PathBuf) -> RstCapture {
        // All packets from the tunnel port; RSTs are counted when reading (a `tcp[tcpflags]` capture filter
        // matched nothing here even when RSTs were on the wire).
        let filter = format!("tcp src port {PORT}");
        let child = ns
            .command("tcpdump")
            .args(["-i", dev, "-U", "-n", "-w", file.to_str().unwrap(), &filter])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        // Wait until tcpdump has created its file (it does so once the capture is open).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RstCapture { child, file }
    }

    /// Stops the capture and returns the number of packets it holds.
    fn packets(mut self) -> usize {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let out = std::process::Command::new("tcpdump").args(["-n", "-r"]).arg(&self.file).output().expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("Flags [R")).count()
    }
}

impl Drop for RstCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One ICMP echo request/reply with `dst` over a raw socket (root), bounded by a 5 s receive timeout.
fn icmp_echo(dst: std::net::Ipv4Addr) -> std::io::Result<()> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let close = scopeguard(fd);
    let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32)
    };
    let id: u16 = std::process::id() as u16;
    let mut req = [8u8, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1, b'p', b'a', b'q', b'e', b't', b'!', 0, 0];
    let mut sum: u32 = req.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    req[2..4].copy_from_slice(&ck.to_be_bytes());
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.octets()) },
        sin_zero: [0; 8],
    };
    let n = unsafe {
        libc::sendto(fd, req.as_ptr().cast(), req.len(), 0, (&sa as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32)
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
        if n >= ihl + 8 && buf[12..16] == dst.octets() && buf[ihl] == 0 && buf[ihl + 4..ihl + 6] == id.to_be_bytes() {
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

fn counter(o: &XdpOutcome, c: XdpCounter) -> u64 {
    o.counters[c as usize]
}

/// Both ends XDP in `want` mode: 16 MiB each way; on the server no RST leaves the tunnel port (no iptables
/// rules anywhere); other TCP and ICMP still reach the server's stack.
fn xdp_pair(tag: char, want: XdpWant, expect: DataPathMode) {
    let topo = Topo::new(tag, 1);
    let echo = topo.echo();
    let mut server = XdpDaemon::start(&topo.b, &topo.server_cfg(false), &topo.dev_b, want);
    server.wait_attached();
    assert_eq!(server.hub.snapshot().mode, expect);
    let fwd = 18180;
    let mut client = XdpDaemon::start(&topo.a, &topo.client_cfg(0, fwd, echo, false), &topo.dev_a, want);
    client.wait_attached();
    assert_eq!(client.hub.snapshot().mode, expect);
    let cap = RstCapture::start(&topo.b, &topo.dev_b, topo.dir.join("rst.pcap"));
    echo_through(&topo.a, fwd, MIB16, 0x1234_5678);
    let rsts = cap.packets();
    assert_eq!(rsts, 0, "RSTs left the tunnel port on the XDP server");

    // Other TCP (a listener on the server's address) and ICMP pass to the kernel untouched.
    let ip_b = topo.ip_b.clone();
    let other = topo
        .b
        .spawn(move || {
            let l = TcpListener::bind((ip_b.as_str(), 0)).unwrap();
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
    let ip_b = topo.ip_b.clone();
    let echoed = topo
        .a
        .spawn(move || -> std::io::Result<[u8; 5]> {
            let mut c = TcpStream::connect_timeout(&format!("{ip_b}:{}", other.0).parse().unwrap(), Duration::from_secs(5))?;
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
    let ip_b: std::net::Ipv4Addr = topo.ip_b.parse().unwrap();
    topo.a.spawn(move || icmp_echo(ip_b)).join().unwrap().unwrap().expect("ICMP to the server while the tunnel runs");

    let c = client.finish();
    let s = server.finish();
    assert!(counter(&s, XdpCounter::Steered) > 10_000, "server steered {:?}", s.counters);
    assert!(counter(&c, XdpCounter::Steered) > 10_000, "client steered {:?}", c.counters);
    assert!(counter(&s, XdpCounter::Passed) > 0, "the other TCP and ICMP passed");
    assert_eq!(s.snapshots[0].session_opens, 1, "server worker: {:?}", s.snapshots[0]);
}

#[test]
fn native_pair_moves_16_mib_each_way_without_rsts() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    xdp_pair('n', XdpWant::Native, DataPathMode::XdpNative);
}

#[test]
fn generic_pair_moves_16_mib_each_way_without_rsts() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    xdp_pair('g', XdpWant::Generic, DataPathMode::XdpGeneric);
}

#[test]
fn xdp_server_with_pcap_client() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new('s', 1);
    let echo = topo.echo();
    let mut server = XdpDaemon::start(&topo.b, &topo.server_cfg(false), &topo.dev_b, XdpWant::Auto);
    server.wait_attached();
    let fwd = 18181;
    let _client = PcapDaemon::start(
        &topo.a,
        &topo,
        "client",
        &topo.client_cfg(0, fwd, echo, false),
        &client_rules(&topo.ip_b, PORT),
    );
    echo_through(&topo.a, fwd, MIB16, 0x0bad_cafe);
    let s = server.finish();
    assert!(counter(&s, XdpCounter::Steered) > 10_000, "{:?}", s.counters);
}

#[test]
fn pcap_server_with_xdp_client() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new('c', 1);
    let echo = topo.echo();
    let _server = PcapDaemon::start(&topo.b, &topo, "server", &topo.server_cfg(false), &server_rules(PORT));
    let fwd = 18182;
    let mut client = XdpDaemon::start(&topo.a, &topo.client_cfg(0, fwd, echo, false), &topo.dev_a, XdpWant::Generic);
    client.wait_attached();
    echo_through(&topo.a, fwd, MIB16, 0x5eed_0001);
    let c = client.finish();
    assert!(counter(&c, XdpCounter::Steered) > 10_000, "{:?}", c.counters);
}

#[test]
fn two_queues_spread_sessions_over_both_workers() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new('q', 2);
    let echo = topo.echo();
    let mut server = XdpDaemon::start(&topo.b, &topo.server_cfg(false), &topo.dev_b, XdpWant::Native);
    server.wait_attached();
    // Two pcap clients on consecutive local ports: the server's owner hash puts them on different workers.
    let (f1, f2) = (18183, 18184);
    let rules = client_rules(&topo.ip_b, PORT);
    let _c1 = PcapDaemon::start(&topo.a, &topo, "client1", &topo.client_cfg(40000, f1, echo, false), &rules);
    let _c2 = PcapDaemon::start(&topo.a, &topo, "client2", &topo.client_cfg(40001, f2, echo, false), &[]);
    std::thread::scope(|sc| {
        let t1 = sc.spawn(|| echo_through(&topo.a, f1, 8 << 20, 11));
        echo_through(&topo.a, f2, 8 << 20, 22);
        t1.join().expect("first client transfer");
    });
    let s = server.finish();
    assert_eq!(s.workers, 2);
    // Each worker owns (and transmits for) its session; a worker's frames may arrive on either queue
    // (veth picks the queue by sending CPU), the other worker then hands them over, so only the sum of
    // the sockets' RX counts is fixed.
    for (i, w) in s.snapshots.iter().enumerate().take(2) {
        assert!(w.session_opens > 0 && w.tx_packets > 1000, "worker {i} served no session: {w:?}");
    }
    let rx: u64 = s.snapshots.iter().map(|w| w.rx_packets).sum();
    assert!(rx > 1000, "the queue sockets received {rx} frames");
}

#[test]
fn guard_flood_is_dropped_in_xdp() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new('f', 1);
    let echo = topo.echo();
    let mut server = XdpDaemon::start(&topo.b, &topo.server_cfg(true), &topo.dev_b, XdpWant::Native);
    server.wait_attached();
    let fwd = 18185;
    let mut client = XdpDaemon::start(&topo.a, &topo.client_cfg(0, fwd, echo, true), &topo.dev_a, XdpWant::Native);
    client.wait_attached();
    echo_through(&topo.a, fwd, 1 << 20, 7);
    let client_out = client.finish();
    assert!(counter(&client_out, XdpCounter::Steered) > 0);
    // Wait for a snapshot taken after the client stopped: the worker's rx count then stays put.
    std::thread::sleep(Duration::from_millis(1200));
    let rx_before: u64 = server.hub.snapshot().workers.iter().map(|w| w.rx_packets).sum();

    // Flood: 20 000 frames to the tunnel port with payloads that carry no valid guard cookie.
    const FLOOD: u64 = 20_000;
    let (dev, src, dst) = (topo.dev_a.clone(), topo.ip_a.clone(), topo.ip_b.clone());
    let (mac_a, mac_b) = (topo.mac_a, topo.mac_b);
    topo.a
        .spawn(move || {
            use paqet::io::pcap::{PcapConfig, PcapIo};
            use paqet::io::PacketIo;
            use paqet::wire::envelope::{EnvelopeBuilder, TcpFlags};
            let mac = |s: &str| -> [u8; 6] {
                let v: Vec<u8> = s.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
                v.try_into().unwrap()
            };
            let mut io = PcapIo::open(PcapConfig::new(dev, 45000)).expect("pcap injector");
            let mut env = EnvelopeBuilder::new(
                mac(mac_a),
                mac(mac_b),
                format!("{src}:45000").parse().unwrap(),
                format!("{dst}:{PORT}").parse().unwrap(),
                1,
            )
            .unwrap();
            let flags = TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0);
            let body = pattern(200, 99);
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
        let dropped = server.hub.snapshot().xdp.map(|c| c[XdpCounter::GuardDropped as usize]).unwrap_or(0);
        if dropped >= FLOOD {
            break;
        }
        assert!(Instant::now() < deadline, "guard_dropped = {dropped}, expected ≥ {FLOOD}");
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
                threads.push(std::thread::spawn(move || -> std::io::Result<(usize, bool)> {
                    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    c.set_read_timeout(Some(Duration::from_secs(90)))?;
                    c.set_write_timeout(Some(Duration::from_secs(90)))?;
                    let data = pattern(n, 0x7700 + k as u32);
                    let mut w = c.try_clone()?;
                    let out = data.clone();
                    let writer = std::thread::spawn(move || w.write_all(&out));
                    let mut got = vec![0u8; n];
                    c.read_exact(&mut got)?;
                    writer.join().expect("writer")?;
                    Ok((k, Sha256::digest(&data) == Sha256::digest(&got)))
                }));
            }
            threads.into_iter().map(|t| t.join().expect("connection thread")).collect()
        })
        .join()
        .expect("client thread")
        .expect("netns");
    let results = r.unwrap_or_else(|e| panic!("a parallel transfer through the tunnel failed: {e}"));
    assert_eq!(results.len(), conns);
    for (k, same) in results {
        assert!(same, "connection {k}: {n} bytes echoed through the tunnel differ");
    }
}

/// Tunnel frames a client at `ip` sends to the server port, captured with `tcpdump` (headers only).
struct TunnelCapture {
    child: Child,
    file: PathBuf,
    client_ip: String,
}

impl TunnelCapture {
    fn start(ns: &Netns, dev: &str, file: PathBuf, client_ip: &str) -> TunnelCapture {
        let filter = format!("tcp and src host {client_ip} and dst port {PORT}");
        let child = ns
            .command("tcpdump")
            .args(["-i", dev, "-U", "-n", "-s", "96", "-w", file.to_str().unwrap(), &filter])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        TunnelCapture { child, file, client_ip: client_ip.to_owned() }
    }

    /// Stops the capture; returns the number of frames per client source port.
    fn frames_per_port(mut self) -> std::collections::BTreeMap<u16, usize> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let out = std::process::Command::new("tcpdump").args(["-n", "-r"]).arg(&self.file).output().expect("tcpdump -r");
        let prefix = format!("{}.", self.client_ip);
        let mut per_port = std::collections::BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "12:00:00.000000 IP 10.215.9.1.40001 > 10.215.9.2.9999: Flags [P.], ..."
            let Some(src) = line.split_whitespace().find(|w| w.starts_with(&prefix)) else { continue };
            if let Ok(port) = src[prefix.len()..].parse::<u16>() {
                *per_port.entry(port).or_insert(0) += 1;
            }
        }
        per_port
    }
}

impl Drop for TunnelCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An XDP client with `transport.conn = 4` on a 2-queue veth: all four sessions come up on four local ports,
/// two per worker (port % 2 = worker), and carry data: 24 parallel connections of 1 MiB each way, byte-exact.
/// The server is the pcap binary, so a capture on its side sees every frame the client sends and can tell
/// the sessions apart by their source ports.
#[test]
fn xdp_client_runs_all_conn_sessions_over_both_workers() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new('m', 2);
    let echo = topo.echo();
    let _server = PcapDaemon::start(&topo.b, &topo, "server", &topo.server_cfg(false), &server_rules(PORT));
    let fwd = 18186;
    let cfg = topo.client_cfg(0, fwd, echo, false).replace("conn = 1\n", "conn = 4\n");
    assert!(cfg.contains("conn = 4\n"));
    let mut client = XdpDaemon::start(&topo.a, &cfg, &topo.dev_a, XdpWant::Native);
    client.wait_attached();
    // The tunnel is up (one small exchange), then the capture runs over the parallel transfer.
    echo_through(&topo.a, fwd, 4096, 3);
    let cap = TunnelCapture::start(&topo.b, &topo.dev_b, topo.dir.join("tunnel.pcap"), &topo.ip_a);
    const CONNS: usize = 24;
    parallel_echo(&topo.a, fwd, CONNS, 1 << 20);
    let per_port = cap.frames_per_port();
    // The final snapshots are taken when the daemon stops, sessions still up.
    let c = client.finish();
    let live: Vec<u64> = c.snapshots.iter().map(|w| w.sessions).collect();
    eprintln!("client frames per source port: {per_port:?}");
    for (i, w) in c.snapshots.iter().enumerate() {
        eprintln!("client worker {i}: handed {} dropped {}", w.rx_cross_worker, w.rx_handoff_drops);
    }

    assert_eq!(c.workers, 2);
    assert_eq!(live, vec![2, 2], "live sessions per client worker");
    for (i, w) in c.snapshots.iter().enumerate() {
        assert!(w.session_opens >= 2 && w.tx_packets > 1000, "client worker {i} ran no sessions: {w:?}");
    }
    // Four sessions, four local ports, two owned by each worker; each carried at least one 1 MiB stream
    // (about 800 full frames), far above what an idle session sends (acks, keepalives).
    let busy: Vec<(u16, usize)> = per_port.iter().filter(|(_, n)| **n > 500).map(|(p, n)| (*p, *n)).collect();
    assert_eq!(busy.len(), 4, "frames per client source port: {per_port:?}");
    for w in 0..2u16 {
        assert_eq!(busy.iter().filter(|(p, _)| p % 2 == w).count(), 2, "ports of worker {w}: {per_port:?}");
    }
    assert!(counter(&c, XdpCounter::Steered) > 10_000, "client steered {:?}", c.counters);
    assert_eq!(counter(&c, XdpCounter::GuardDropped), 0);
}

/// Both ends XDP on 2-queue veths with the guard on: the client's four sessions (two per worker) reach the
/// server's two workers and carry parallel transfers byte-exact; the client-side steering (frames from the
/// server endpoint to the client's session ports) passes the guard check in the program.
#[test]
fn xdp_pair_with_conn_4_and_guard_on_two_queues() {
    if skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new('k', 2);
    let echo = topo.echo();
    let mut server = XdpDaemon::start(&topo.b, &topo.server_cfg(true), &topo.dev_b, XdpWant::Native);
    server.wait_attached();
    let fwd = 18187;
    let cfg = topo.client_cfg(0, fwd, echo, true).replace("conn = 1\n", "conn = 4\n");
    let mut client = XdpDaemon::start(&topo.a, &cfg, &topo.dev_a, XdpWant::Native);
    client.wait_attached();
    echo_through(&topo.a, fwd, 4096, 5);
    parallel_echo(&topo.a, fwd, 8, 1 << 20);
    // The final snapshots are taken when the daemons stop, sessions still up.
    let c = client.finish();
    let s = server.finish();
    let client_live: Vec<u64> = c.snapshots.iter().map(|w| w.sessions).collect();
    let server_live: u64 = s.snapshots.iter().map(|w| w.sessions).sum();
    assert_eq!(client_live, vec![2, 2], "live sessions per client worker");
    assert_eq!(server_live, 4, "live sessions on the server");
    let opened: u64 = s.snapshots.iter().map(|w| w.session_opens).sum();
    assert!(opened >= 4, "server opened {opened} sessions: {:?}", s.snapshots);
    assert_eq!(counter(&c, XdpCounter::GuardDropped), 0, "valid frames dropped by the client's guard");
    assert_eq!(counter(&s, XdpCounter::GuardDropped), 0, "valid frames dropped by the server's guard");
    assert!(counter(&c, XdpCounter::Steered) > 5_000, "client steered {:?}", c.counters);
}
