//! `bench tunnel`: the end-to-end benches of issues 3 and 4, side by side in one run on one veth pair
//! between two namespaces of our own (client side "c", server side "s"):
//!
//! - bulk download (one TCP stream, N seconds) over plain TCP, then through the tunnel in mode fast
//!   (upstream's default windows) and fast3 with 2048-packet windows, with the CPU % of each daemon
//!   (`/proc/PID/stat` utime+stime deltas) and CPU per MB;
//! - request latency: a new connection through SOCKS5 (or the TCP forward when this build serves no
//!   SOCKS5) + a 100-byte request and reply, p50/p90/p99 over 200, beside direct TCP;
//! - VmRSS of both daemons with 1,000 and 10,000 concurrent idle streams, each reaching the server's target;
//! - per data-path mode (`--modes`): the same bulk bench with ratios vs pcap, and a flood of 64-byte-payload
//!   frames at the server port, counted by the server's `/metrics` per CPU-second of the server.
//!
//! Traffic never leaves the two namespaces.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::flood;
use crate::sys::{self, Daemon, Netns, NetnsExt, TempDir, VethPair};

pub(crate) const PORT: u16 = 9999;
pub(crate) const SOURCE_PORT: u16 = 5201;
pub(crate) const ECHO_PORT: u16 = 5202;
const IDLE_PORT: u16 = 5203;
const FWD_SOURCE: u16 = 18001;
const FWD_ECHO: u16 = 18002;
const FWD_IDLE: u16 = 18003;
pub(crate) const SOCKS_PORT: u16 = 11080;
pub(crate) const METRICS_PORT: u16 = 19090;
/// kcptun reference run: its UDP port on the server side and its local TCP port on the client side.
const KCPTUN_PORT: u16 = 29900;
pub(crate) const KCPTUN_LOCAL: u16 = 18010;
/// Bench mode: `paqet-dp --mode pcap` with upstream's three iptables rules only (no raw PREROUTING DROP).
const UPSTREAM_RULES: &str = "pcap-upstream-rules";
const KEY: &str = "paqet-dp-bench-key";
const MAC_C: &str = "02:00:00:be:0c:01";
const MAC_S: &str = "02:00:00:be:0c:02";
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const REQ: usize = 100;

/// Upstream paqet's figures on this machine kind, from issue 3 (for the report).
const UPSTREAM_FAST_PCT: f64 = 0.6;
const UPSTREAM_FAST3_PCT: f64 = 2.4;

/// Options of `bench tunnel`.
pub struct Opts {
    pub bin: String,
    pub modes: Vec<String>,
    pub secs: u64,
    pub streams: Vec<usize>,
    pub latency_n: usize,
    pub flood_secs: u64,
    pub guard: bool,
    /// Let both daemons float over all CPUs instead of one core each.
    pub share_cpus: bool,
    /// Congestion controls to run every configuration with (`transport.kcp.cc`), side by side.
    pub ccs: Vec<String>,
    /// Packet protections to run every configuration with, side by side: `aes` (kcp-go's
    /// `block = "aes"`, upstream's wire) or `noise` (paqet-dp's authenticated wire).
    pub cryptos: Vec<String>,
}

/// A tunnel configuration under test.
#[derive(Clone, Copy)]
struct Kcp {
    label: &'static str,
    mode: &'static str,
    /// Fixed windows on both ends; None = upstream's fixed defaults per role (server 1024/1024, client
    /// 128/512), written out because a TOML config now auto-tunes unset windows.
    wnd: Option<u32>,
    /// `transport.kcp.cc`.
    cc: &'static str,
    /// `aes` or `noise` (see [`CRYPTOS`]).
    crypto: &'static str,
}

const CONFIGS: [Kcp; 2] = [
    Kcp {
        label: "fast (upstream default windows)",
        mode: "fast",
        wnd: None,
        cc: "bbr",
        crypto: "aes",
    },
    Kcp {
        label: "fast3, 2048-packet windows",
        mode: "fast3",
        wnd: Some(2048),
        cc: "bbr",
        crypto: "aes",
    },
];

/// The congestion-control names `--cc` accepts (fixed needs a link rate, which a veth does not have).
pub const CCS: [&str; 2] = ["bbr", "off"];

/// The packet protections `--crypto` accepts: kcp-go's `aes` (upstream's wire) and paqet-dp's `noise`.
pub const CRYPTOS: [&str; 2] = ["aes", "noise"];

/// Fixed noise keys of the bench (`paqet-dp keygen` output; the bench's namespaces only).
const NOISE_SERVER_PRIVATE: &str = "cdRfggn1x0aTbuqzmYXPuAwWdrb/+KJCNnAKWesjLYQ=";
const NOISE_SERVER_PUBLIC: &str = "G1be7cJAM29yolG0AONk/KF7Dn8OMjIjP93Yksg0qSE=";
const NOISE_CLIENT_PRIVATE: &str = "yOxRofI1oo3SaDNdRdyUBi4a19hYWf68TZQwNUFWW1I=";
const NOISE_CLIENT_PUBLIC: &str = "NceY0lNxstVGKvcKh0z+O/zHdbpM8K4zxBZnV5RzPgY=";

impl Kcp {
    fn with_cc(self, cc: &str) -> Kcp {
        Kcp {
            cc: CCS.into_iter().find(|c| *c == cc).unwrap_or("bbr"),
            ..self
        }
    }
    fn with_crypto(self, crypto: &str) -> Kcp {
        Kcp {
            crypto: CRYPTOS.into_iter().find(|c| *c == crypto).unwrap_or("aes"),
            ..self
        }
    }
    fn name(&self, many_ccs: bool, many_cryptos: bool) -> String {
        let mut s = self.label.to_string();
        if many_ccs {
            s.push_str(&format!(", cc {}", self.cc));
        }
        if many_cryptos {
            s.push_str(&format!(", {}", self.crypto));
        }
        s
    }
}

/// `cfg` (one of [`server_toml`] / [`client_toml`]) with the protection of `k`: for `noise`, the
/// `block = "aes"` and key lines become `block = "noise"` and a `[transport.noise]` table is added.
fn with_crypto(cfg: String, k: Kcp, server: bool) -> String {
    noise_wire(cfg, k.crypto == "noise", server)
}

/// `cfg` (one of [`server_toml`] / [`client_toml`]) on the noise wire when `noise`: the `block = "aes"` and
/// key lines become `block = "noise"` and a `[transport.noise]` table with the bench's keys is added.
pub(crate) fn noise_wire(cfg: String, noise: bool, server: bool) -> String {
    if !noise {
        return cfg;
    }
    let section = if server {
        format!("private_key = \"{NOISE_SERVER_PRIVATE}\"\nclient_public_keys = [\"{NOISE_CLIENT_PUBLIC}\"]\n")
    } else {
        format!("private_key = \"{NOISE_CLIENT_PRIVATE}\"\nserver_public_key = \"{NOISE_SERVER_PUBLIC}\"\n")
    };
    format!(
        "{}\n[transport.noise]\n{section}",
        cfg.replace(
            &format!("block = \"aes\"\nkey = \"{KEY}\"\n"),
            "block = \"noise\"\n"
        )
    )
}

/// How the client side reaches a target on the server side.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Front {
    Direct,
    Forward,
    Socks5,
    /// kcptun-client's local port (bulk source only).
    Kcptun,
}

impl Front {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Front::Direct => "direct TCP",
            Front::Forward => "TCP forward",
            Front::Socks5 => "SOCKS5",
            Front::Kcptun => "kcptun-client",
        }
    }
}

/// Target servers living in the server namespace (threads of this process).
struct Targets {
    source_tid: AtomicI32,
}

/// The idle-stream target: a child process (`xtask __idle-target PORT`) in the server namespace that
/// accepts and holds connections and prints how many it holds, so its descriptors do not count against
/// this process's RLIMIT_NOFILE. Killed (closing every held connection) when dropped.
struct IdleTarget {
    child: std::process::Child,
    accepted: Arc<AtomicUsize>,
}

impl IdleTarget {
    fn spawn(ns: &Netns) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let mut child = ns
            .command(exe.to_str().context("xtask path")?)
            .args(["__idle-target", &IDLE_PORT.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawning the idle target")?;
        let out = child.stdout.take().context("idle target stdout")?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if line == "listening" {
                    let _ = ready_tx.send(());
                } else if let Ok(n) = line.trim().parse() {
                    a.store(n, Ordering::SeqCst);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the idle target did not start listening")?;
        Ok(Self { child, accepted })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for IdleTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `xtask __idle-target PORT`: accepts on 0.0.0.0:PORT and holds every connection; prints `listening`,
/// then the number held whenever it changed (at most every 50 ms). Runs until killed.
pub fn idle_target_main(port: &str) -> Result<()> {
    let port: u16 = port
        .parse()
        .with_context(|| format!("idle target port {port:?}"))?;
    sys::raise_nofile(1 << 20)?;
    let l = TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("binding idle target port {port}"))?;
    // std listens with a backlog of 128; thousands of dials arrive at once here.
    // SAFETY: re-listening on our own listening socket only changes its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 8192) };
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            match s {
                Ok(s) => {
                    held.push(s);
                    c.store(held.len(), Ordering::SeqCst);
                }
                Err(e) => {
                    eprintln!("idle target: accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    let mut out = std::io::stdout();
    writeln!(out, "listening")?;
    out.flush()?;
    let mut last = usize::MAX;
    loop {
        let n = count.load(Ordering::SeqCst);
        if n != last {
            writeln!(out, "{n}")?;
            out.flush()?;
            last = n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Namespaces, veth and target servers. Field order = drop order: the veth goes before the namespaces.
struct Topo {
    veth: VethPair,
    ns_c: Netns,
    ns_s: Netns,
    ip_c: Ipv4Addr,
    ip_s: Ipv4Addr,
    targets: Arc<Targets>,
}

impl Topo {
    fn new() -> Result<Self> {
        let pid = std::process::id();
        let k = (pid % 250 + 1) as u8;
        let (ip_c, ip_s) = (Ipv4Addr::new(10, 217, k, 1), Ipv4Addr::new(10, 217, k, 2));
        let ns_c = sys::netns("c")?;
        let ns_s = sys::netns("s")?;
        let veth = sys::veth(
            &format!("pb{pid}c"),
            &format!("pb{pid}s"),
            &ns_c,
            &ns_s,
            MAC_C,
            MAC_S,
            &format!("{ip_c}/24"),
            &format!("{ip_s}/24"),
        )?;
        // Upstream's host rules of the pcap path (spec §2.4); harmless in XDP modes. The raw PREROUTING DROP
        // `paqet-dp run --manage-firewall` adds beside them is set per mode (`Topo::stack_drop`).
        host_rules(&ns_c, &ns_s, ip_s)?;
        let targets = Arc::new(Targets {
            source_tid: AtomicI32::new(0),
        });
        let t = targets.clone();
        ns_s.run(move || start_targets(t))?;
        Ok(Self {
            veth,
            ns_c,
            ns_s,
            ip_c,
            ip_s,
            targets,
        })
    }

    /// Adds (`on`) or removes the raw PREROUTING DROP rules `paqet-dp --manage-firewall` puts beside
    /// upstream's three (the kernel's stack then never processes tunnel packets in pcap mode).
    fn stack_drop(&self, on: bool) -> Result<()> {
        stack_drop(&self.ns_c, &self.ns_s, self.ip_s, on)
    }

    /// Sets TX checksum offload (and with it TSO/GSO) on both veth ends.
    fn tx_offload(&self, on: bool) -> Result<()> {
        let v = if on { "on" } else { "off" };
        self.ns_c.exec(&["ethtool", "-K", &self.veth.a, "tx", v])?;
        self.ns_s.exec(&["ethtool", "-K", &self.veth.b, "tx", v])?;
        Ok(())
    }

    fn server_rx_packets(&self) -> Result<u64> {
        let p = format!("/sys/class/net/{}/statistics/rx_packets", self.veth.b);
        let s = self.ns_s.exec(&["cat", &p])?;
        s.trim().parse().with_context(|| format!("{p}: {s:?}"))
    }
}

/// Upstream's three host rules of the pcap path (spec §2.4) on both ends: NOTRACK for the tunnel's packets
/// and a mangle OUTPUT DROP of the RSTs the kernel would send; harmless in XDP modes.
pub(crate) fn host_rules(ns_c: &Netns, ns_s: &Netns, ip_s: Ipv4Addr) -> Result<()> {
    let port = PORT.to_string();
    let ip_s_txt = ip_s.to_string();
    for r in [
        vec![
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "NOTRACK",
        ],
        vec![
            "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "--sport", &port, "-j", "NOTRACK",
        ],
        vec![
            "iptables",
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--sport",
            &port,
            "--tcp-flags",
            "RST",
            "RST",
            "-j",
            "DROP",
        ],
    ] {
        ns_s.exec(&r)?;
    }
    for r in [
        vec![
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-s",
            &ip_s_txt,
            "--sport",
            &port,
            "-j",
            "NOTRACK",
        ],
        vec![
            "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "-d", &ip_s_txt, "--dport",
            &port, "-j", "NOTRACK",
        ],
        vec![
            "iptables",
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &ip_s_txt,
            "--dport",
            &port,
            "--tcp-flags",
            "RST",
            "RST",
            "-j",
            "DROP",
        ],
    ] {
        ns_c.exec(&r)?;
    }
    Ok(())
}

/// Adds (`on`) or removes the raw PREROUTING DROP rules `paqet-dp --manage-firewall` puts beside
/// upstream's three (the kernel's stack then never processes tunnel packets in pcap mode).
pub(crate) fn stack_drop(ns_c: &Netns, ns_s: &Netns, ip_s: Ipv4Addr, on: bool) -> Result<()> {
    let port = PORT.to_string();
    let ip_s = ip_s.to_string();
    let server: Vec<&str> = vec!["PREROUTING", "-p", "tcp", "--dport", &port, "-j", "DROP"];
    let client: Vec<&str> = vec![
        "PREROUTING",
        "-p",
        "tcp",
        "-s",
        &ip_s,
        "--sport",
        &port,
        "-j",
        "DROP",
    ];
    for (ns, spec) in [(ns_s, server), (ns_c, client)] {
        let cmd = |op: &'static str| -> Vec<&str> {
            [&["iptables", "-t", "raw", op][..], &spec[..]].concat()
        };
        let present = ns.exec(&cmd("-C")).is_ok();
        if on && !present {
            ns.exec(&cmd("-A"))?;
        } else if !on && present {
            ns.exec(&cmd("-D"))?;
        }
    }
    Ok(())
}

/// Binds the source (endless data), echo and idle-holding servers on 0.0.0.0 of the current namespace.
fn start_targets(t: Arc<Targets>) -> Result<()> {
    let bind = |p: u16| {
        TcpListener::bind(("0.0.0.0", p)).with_context(|| format!("binding target port {p}"))
    };
    let (src, echo) = (bind(SOURCE_PORT)?, bind(ECHO_PORT)?);
    let ts = t;
    std::thread::spawn(move || {
        for c in src.incoming().flatten() {
            let ts = ts.clone();
            std::thread::spawn(move || {
                ts.source_tid.store(sys::gettid(), Ordering::SeqCst);
                let buf = vec![0x5au8; 256 << 10];
                let mut c = c;
                while c.write_all(&buf).is_ok() {}
            });
        }
    });
    std::thread::spawn(move || {
        for c in echo.incoming().flatten() {
            std::thread::spawn(move || echo_conn(c));
        }
    });
    Ok(())
}

/// Writes back everything `c` reads until it closes or fails (the echo targets of the benches).
pub(crate) fn echo_conn(mut c: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// The `[transport.kcp]` lines before `block` of configuration `k`: its mode and windows.
fn kcp_lines(k: Kcp, server: bool) -> String {
    let (snd, rcv) = match (k.wnd, server) {
        (Some(w), _) => (w, w),
        (None, true) => (1024, 1024),
        (None, false) => (128, 512),
    };
    format!(
        "mode = \"{}\"\ncc = \"{}\"\nsndwnd = {snd}\nrcvwnd = {rcv}\n",
        k.mode, k.cc
    )
}

fn server_config(dev: &str, ip_s: Ipv4Addr, k: Kcp, guard: bool) -> String {
    with_crypto(
        server_toml(dev, ip_s, MAC_C, &kcp_lines(k, true), guard),
        k,
        true,
    )
}

fn client_config(dev: &str, ip_c: Ipv4Addr, ip_s: Ipv4Addr, k: Kcp, guard: bool) -> String {
    with_crypto(
        client_toml(dev, ip_c, ip_s, MAC_S, &kcp_lines(k, false), guard),
        k,
        false,
    )
}

/// The bench's server configuration on interface `dev` with address `ip_s`, sending to `router_mac`;
/// `kcp` is the `[transport.kcp]` text before `block` (newline-terminated lines: mode, windows, …).
pub(crate) fn server_toml(
    dev: &str,
    ip_s: Ipv4Addr,
    router_mac: &str,
    kcp: &str,
    guard: bool,
) -> String {
    format!(
        r#"role = "server"
[log]
level = "warn"
[listen]
addr = ":{PORT}"
[network]
interface = "{dev}"
[network.ipv4]
addr = "{ip_s}:{PORT}"
router_mac = "{router_mac}"
[transport]
protocol = "kcp"
[transport.kcp]
{kcp}block = "aes"
key = "{KEY}"
guard = {guard}
max_streams_total = -1
max_streams_per_session = -1
[metrics]
listen = "127.0.0.1:{METRICS_PORT}"
"#
    )
}

/// The bench's client configuration (SOCKS5 and TCP forwards to the source, echo and idle targets; more
/// `[[forward]]` tables may be appended), arguments as for [`server_toml`].
pub(crate) fn client_toml(
    dev: &str,
    ip_c: Ipv4Addr,
    ip_s: Ipv4Addr,
    router_mac: &str,
    kcp: &str,
    guard: bool,
) -> String {
    let mut s = format!(
        r#"role = "client"
[log]
level = "warn"
[server]
addr = "{ip_s}:{PORT}"
[network]
interface = "{dev}"
[network.ipv4]
addr = "{ip_c}:0"
router_mac = "{router_mac}"
[transport]
protocol = "kcp"
[transport.kcp]
{kcp}block = "aes"
key = "{KEY}"
guard = {guard}
[metrics]
listen = "127.0.0.1:{METRICS_PORT}"
[[socks5]]
listen = "127.0.0.1:{SOCKS_PORT}"
"#
    );
    for (l, t) in [
        (FWD_SOURCE, SOURCE_PORT),
        (FWD_ECHO, ECHO_PORT),
        (FWD_IDLE, IDLE_PORT),
    ] {
        s.push_str(&format!("[[forward]]\nlisten = \"127.0.0.1:{l}\"\ntarget = \"127.0.0.1:{t}\"\nprotocol = \"tcp\"\n"));
    }
    s
}

/// Opens a connection from the client namespace (calling thread) to target port `port` of the server
/// side through `front`, SOCKS5 handshake included.
pub(crate) fn open(front: Front, ip_s: Ipv4Addr, port: u16) -> Result<TcpStream> {
    let connect = |a: SocketAddr| -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&a, IO_TIMEOUT)
            .with_context(|| format!("connecting to {a}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(s)
    };
    let lo = Ipv4Addr::LOCALHOST;
    match front {
        Front::Direct => connect(SocketAddr::new(ip_s.into(), port)),
        Front::Kcptun if port == SOURCE_PORT => connect(SocketAddr::new(lo.into(), KCPTUN_LOCAL)),
        Front::Kcptun => bail!("the kcptun reference only carries the bulk source"),
        Front::Forward => {
            let f = match port {
                SOURCE_PORT => FWD_SOURCE,
                ECHO_PORT => FWD_ECHO,
                IDLE_PORT => FWD_IDLE,
                _ => bail!("no forward configured for target port {port}"),
            };
            connect(SocketAddr::new(lo.into(), f))
        }
        Front::Socks5 => socks5_connect(SOCKS_PORT, port),
    }
}

/// A SOCKS5 CONNECT (no authentication) through the proxy on `127.0.0.1:socks` to `127.0.0.1:port` of the
/// server side, from the calling thread's namespace.
pub(crate) fn socks5_connect(socks: u16, port: u16) -> Result<TcpStream> {
    let a = SocketAddr::from((Ipv4Addr::LOCALHOST, socks));
    let mut s =
        TcpStream::connect_timeout(&a, IO_TIMEOUT).with_context(|| format!("connecting to {a}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m).context("SOCKS5 method reply")?;
    if m != [5, 0] {
        bail!("SOCKS5 method reply {m:?}, expected [5, 0]");
    }
    let p = port.to_be_bytes();
    s.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]])?;
    let mut h = [0u8; 4];
    s.read_exact(&mut h).context("SOCKS5 CONNECT reply")?;
    if h[0] != 5 || h[1] != 0 {
        bail!(
            "SOCKS5 CONNECT to 127.0.0.1:{port} refused (reply code {})",
            h[1]
        );
    }
    let rest = match h[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            usize::from(l[0]) + 2
        }
        t => bail!("SOCKS5 reply with address type {t}"),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip)?;
    Ok(s)
}

/// One request/reply of `REQ` bytes on a new connection; returns the elapsed time.
fn request(front: Front, ip_s: Ipv4Addr) -> Result<Duration> {
    let req = [0x42u8; REQ];
    let t0 = Instant::now();
    let mut s = open(front, ip_s, ECHO_PORT)?;
    s.write_all(&req)?;
    let mut got = [0u8; REQ];
    s.read_exact(&mut got).context("reading the echo reply")?;
    let dt = t0.elapsed();
    if got != req {
        bail!("echo reply differs from the request");
    }
    Ok(dt)
}

/// Result of one bulk download.
#[derive(Clone, Copy)]
struct Bulk {
    mb_per_s: f64,
    /// CPU % of (client side, server side): the daemons, or for plain TCP the sink and source threads.
    cpu_pct: (f64, f64),
    /// Milliseconds of CPU (both sides) per MB moved.
    cpu_ms_per_mb: f64,
}

/// Downloads from the source target through `front` for `secs` after a 1 s warm-up. `pids` are the
/// daemons to charge CPU to; `None` charges the reading and writing threads (plain TCP).
fn bulk(topo: &Topo, front: Front, secs: u64, pids: Option<(u32, u32)>) -> Result<Bulk> {
    topo.targets.source_tid.store(0, Ordering::SeqCst);
    let ip_s = topo.ip_s;
    let targets = topo.targets.clone();
    topo.ns_c.run(move || {
        let mut s = open(front, ip_s, SOURCE_PORT)?;
        let mut buf = vec![0u8; 256 << 10];
        let mut read_for = |d: Duration| -> Result<u64> {
            let end = Instant::now() + d;
            let mut n = 0u64;
            while Instant::now() < end {
                match s.read(&mut buf) {
                    Ok(0) => bail!("the source stream ended after {n} bytes"),
                    Ok(k) => n += k as u64,
                    Err(e) => bail!("reading the bulk stream: {e}"),
                }
            }
            Ok(n)
        };
        read_for(Duration::from_secs(1))?;
        let me = sys::gettid();
        let src_tid = targets.source_tid.load(Ordering::SeqCst);
        let cpu = || -> Result<(f64, f64)> {
            match pids {
                Some((c, sv)) => Ok((sys::proc_cpu(c)?, sys::proc_cpu(sv)?)),
                None => Ok((
                    sys::thread_cpu(me)?,
                    if src_tid > 0 {
                        sys::thread_cpu(src_tid)?
                    } else {
                        0.0
                    },
                )),
            }
        };
        let (c0, t0) = (cpu()?, Instant::now());
        let bytes = read_for(Duration::from_secs(secs))?;
        let (c1, dt) = (cpu()?, t0.elapsed().as_secs_f64());
        let mb = bytes as f64 / 1e6;
        let (dc, ds) = (c1.0 - c0.0, c1.1 - c0.1);
        Ok(Bulk {
            mb_per_s: mb / dt,
            cpu_pct: (dc / dt * 100.0, ds / dt * 100.0),
            cpu_ms_per_mb: if mb > 0.0 {
                (dc + ds) * 1e3 / mb
            } else {
                f64::NAN
            },
        })
    })
}

/// Latency percentiles in milliseconds.
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    failures: usize,
    n: usize,
}

fn latency(topo: &Topo, front: Front, n: usize) -> Result<Latency> {
    let ip_s = topo.ip_s;
    topo.ns_c.run(move || {
        for _ in 0..5 {
            let _ = request(front, ip_s);
        }
        let mut v = Vec::with_capacity(n);
        let mut failures = 0;
        let mut last_err = None;
        for _ in 0..n {
            match request(front, ip_s) {
                Ok(d) => v.push(d.as_secs_f64() * 1e3),
                Err(e) => {
                    failures += 1;
                    last_err = Some(e);
                }
            }
        }
        if v.is_empty() {
            bail!(
                "every request failed; last error: {:#}",
                last_err.map(|e| format!("{e:#}")).unwrap_or_default()
            );
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Ok(Latency {
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            failures,
            n,
        })
    })
}

/// Fetches `/metrics` from the daemon in `ns`; `None` when nothing serves it.
fn scrape(ns: &Netns) -> Option<String> {
    scrape_at(ns, METRICS_PORT)
}

/// Fetches `/metrics` from `127.0.0.1:port` in `ns`; `None` when nothing serves it.
pub(crate) fn scrape_at(ns: &Netns, port: u16) -> Option<String> {
    ns.run(move || {
        let a = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut t = String::new();
        s.read_to_string(&mut t)?;
        Ok(t)
    })
    .ok()
    .filter(|t| t.contains("paqet_"))
}

/// Sum of the samples of metric `name` whose labels contain `label` (empty: all).
pub(crate) fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(label) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The cores the server and the client daemon run on: the first and the last CPU this process may use,
/// as two hosts would give each daemon its own (XDP workers pin themselves inside their process's CPU
/// set). `None` with `--share-cpus` or on a one-CPU machine.
fn daemon_cpus(opts: &Opts) -> Option<(usize, usize)> {
    if opts.share_cpus {
        return None;
    }
    let cpus = sys::allowed_cpus();
    match (cpus.first(), cpus.last()) {
        (Some(&a), Some(&b)) if a != b => Some((a, b)),
        _ => None,
    }
}

/// A child process killed (and reaped) when dropped.
pub(crate) struct Proc(pub(crate) std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Go reference: Debian's kcptun (kcp-go + smux v2 with kcp-go's AES-CFB framing: upstream paqet's
/// protocol core, carried over UDP instead of pcap) with the same KCP settings, on the same veth and the same
/// CPU placement, moving the same bulk stream. `None` when kcptun is not installed.
fn kcptun_bulk(topo: &Topo, opts: &Opts) -> Option<Result<Bulk>> {
    if !kcptun_installed() {
        return None;
    }
    Some((|| -> Result<Bulk> {
        let target = format!("127.0.0.1:{SOURCE_PORT}");
        let (server, client) = start_kcptun(
            &topo.ns_c,
            &topo.ns_s,
            topo.ip_s,
            daemon_cpus(opts),
            &target,
            2048,
        )?;
        // Ready when a byte of the source arrives through it.
        let ip_s = topo.ip_s;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = topo.ns_c.run(move || {
                let mut s = open(Front::Kcptun, ip_s, SOURCE_PORT)?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                Ok(())
            });
            if ok.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("no data through kcptun within 15 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bulk(
            topo,
            Front::Kcptun,
            opts.secs,
            Some((client.0.id(), server.0.id())),
        )
    })())
}

/// True when Debian's kcptun (`kcptun-server`, `kcptun-client`) is on the PATH.
pub(crate) fn kcptun_installed() -> bool {
    std::process::Command::new("kcptun-server")
        .arg("--version")
        .output()
        .is_ok()
}

/// Starts kcptun-server in `ns_s` (UDP `ip_s:KCPTUN_PORT`, dialling `target`) and kcptun-client in `ns_c`
/// (TCP `127.0.0.1:KCPTUN_LOCAL`) with the bench's KCP settings (fast3, aes, no compression, no FEC, smux v2)
/// and `wnd`-packet windows, on CPUs `cpus` = (server, client) when given; returns (server, client).
pub(crate) fn start_kcptun(
    ns_c: &Netns,
    ns_s: &Netns,
    ip_s: Ipv4Addr,
    cpus: Option<(usize, usize)>,
    target: &str,
    wnd: u32,
) -> Result<(Proc, Proc)> {
    let wnd = wnd.to_string();
    let common = [
        "--key",
        KEY,
        "--crypt",
        "aes",
        "--mode",
        "fast3",
        "--sndwnd",
        &wnd,
        "--rcvwnd",
        &wnd,
        "--nocomp",
        "--smuxver",
        "2",
        "--ds",
        "0",
        "--ps",
        "0",
        "--keepalive",
        "10",
        "--quiet",
    ];
    let listen = format!("{ip_s}:{KCPTUN_PORT}");
    let start = |ns: &Netns, cpu: Option<usize>, program: &str, ends: [&str; 4]| -> Result<Proc> {
        let child = ns
            .command_on(cpu, program)
            .args(common)
            .args(ends)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Proc(child))
    };
    let local = format!("127.0.0.1:{KCPTUN_LOCAL}");
    let server = start(
        ns_s,
        cpus.map(|c| c.0),
        "kcptun-server",
        ["--listen", &listen, "--target", target],
    )?;
    let client = start(
        ns_c,
        cpus.map(|c| c.1),
        "kcptun-client",
        ["--localaddr", &local, "--remoteaddr", &listen],
    )?;
    Ok((server, client))
}

/// Running daemons of one (mode, config) pair.
struct Pair {
    client: Daemon,
    server: Daemon,
    front: Front,
}

impl Pair {
    fn start(topo: &Topo, opts: &Opts, dir: &TempDir, mode: &str, k: Kcp) -> Result<Self> {
        let tag = format!("{mode}-{}-{}-{}", k.mode, k.cc, k.crypto);
        let cpus = daemon_cpus(opts);
        // `pcap-upstream-rules` is the pcap data path with only upstream's three host rules (see `stack_drop`).
        let mode = if mode == UPSTREAM_RULES { "pcap" } else { mode };
        let mut server = Daemon::spawn(
            &topo.ns_s,
            &opts.bin,
            &dir.0,
            &format!("server-{tag}"),
            &server_config(&topo.veth.b, topo.ip_s, k, opts.guard),
            mode,
            cpus.map(|c| c.0),
        )?;
        let mut client = Daemon::spawn(
            &topo.ns_c,
            &opts.bin,
            &dir.0,
            &format!("client-{tag}"),
            &client_config(&topo.veth.a, topo.ip_c, topo.ip_s, k, opts.guard),
            mode,
            cpus.map(|c| c.1),
        )?;
        // Ready when a request makes it through the forward.
        let ip_s = topo.ip_s;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            server.check_alive()?;
            client.check_alive()?;
            if topo.ns_c.run(move || request(Front::Forward, ip_s)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "no request through the tunnel within 30 s\n--- client log ---\n{}\n--- server log ---\n{}",
                    client.log_tail(10),
                    server.log_tail(10)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let front = if topo.ns_c.run(move || request(Front::Socks5, ip_s)).is_ok() {
            Front::Socks5
        } else {
            Front::Forward
        };
        Ok(Self {
            client,
            server,
            front,
        })
    }

    fn pids(&self) -> (u32, u32) {
        (self.client.pid(), self.server.pid())
    }

    fn alive(&mut self) -> Result<()> {
        self.client.check_alive()?;
        self.server.check_alive()
    }
}

/// VmRSS of both daemons with idle streams open.
struct Rss {
    client_kib: u64,
    server_kib: u64,
    /// Streams that reached the server's target (less than asked when some never arrived).
    reached: usize,
}

/// Opens idle streams until `total` are held, waits (≤ 180 s) until the server's target has accepted them
/// all, and reads both daemons' RSS (also when some streams never arrived: `reached` says how many did).
fn rss_at(
    topo: &Topo,
    pair: &mut Pair,
    idle: &IdleTarget,
    held: &mut Vec<TcpStream>,
    total: usize,
) -> Result<Rss> {
    let need = total.saturating_sub(held.len());
    let (front, ip_s) = (pair.front, topo.ip_s);
    let threads = 8usize;
    let opened: Vec<TcpStream> = topo.ns_c.run(move || {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let k = need / threads + usize::from(i < need % threads);
                std::thread::spawn(move || -> Result<Vec<TcpStream>> {
                    (0..k).map(|_| open(front, ip_s, IDLE_PORT)).collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(need);
        for h in hs {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("opener thread panicked"))??,
            );
        }
        Ok(all)
    })?;
    held.extend(opened);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = idle.accepted();
        if got >= total {
            break;
        }
        pair.alive()?;
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    pair.alive()?;
    let (c, s) = pair.pids();
    Ok(Rss {
        client_kib: sys::rss_kib(c)?,
        server_kib: sys::rss_kib(s)?,
        reached: idle.accepted(),
    })
}

/// Result of the flood against the server.
struct Flood {
    sent_per_s: f64,
    kernel_rx_per_s: f64,
    daemon_rx_per_s: Option<f64>,
    xdp_seen_per_s: Option<f64>,
    server_cpu_pct: f64,
    per_core: Option<f64>,
}

fn flood(topo: &Topo, pair: &Pair, secs: u64) -> Result<Flood> {
    let spid = pair.server.pid();
    let m0 = scrape(&topo.ns_s);
    let k0 = topo.server_rx_packets()?;
    let c0 = sys::proc_cpu(spid)?;
    let t0 = Instant::now();
    let target = flood::Target {
        src_mac: parse_mac(MAC_C),
        dst_mac: parse_mac(MAC_S),
        src: topo.ip_c,
        dst: topo.ip_s,
        dst_port: PORT,
    };
    let dev = topo.veth.a.clone();
    let sent = topo
        .ns_c
        .run(move || flood::run(&dev, &target, Duration::from_secs(secs)))?;
    // Let the daemon drain what is queued before reading its counters.
    std::thread::sleep(Duration::from_millis(500));
    let dt = t0.elapsed().as_secs_f64();
    let c1 = sys::proc_cpu(spid)?;
    let k1 = topo.server_rx_packets()?;
    let m1 = scrape(&topo.ns_s);
    let delta = |name: &str, label: &str| -> Option<f64> {
        Some(
            metric(m1.as_deref()?, name, label)?
                - metric(m0.as_deref()?, name, label).unwrap_or(0.0),
        )
    };
    let daemon_rx = delta("paqet_packets_total", "direction=\"rx\"");
    let xdp_seen = delta("paqet_xdp_packets_total", "counter=\"seen\"");
    let cpu = c1 - c0;
    let send_secs = secs as f64;
    Ok(Flood {
        sent_per_s: sent as f64 / send_secs,
        kernel_rx_per_s: (k1 - k0) as f64 / send_secs,
        daemon_rx_per_s: daemon_rx.map(|v| v / send_secs),
        xdp_seen_per_s: xdp_seen.filter(|v| *v > 0.0).map(|v| v / send_secs),
        server_cpu_pct: cpu / dt * 100.0,
        per_core: daemon_rx.filter(|_| cpu > 0.0).map(|v| v / cpu),
    })
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    m
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

/// Runs the tunnel benches; returns the markdown section.
pub fn run(opts: &Opts) -> Result<String> {
    if !sys::is_root() {
        bail!("`cargo xtask bench tunnel` needs root (network namespaces, veth, pcap/XDP, iptables); run it with sudo, or use `cargo xtask bench micro`");
    }
    let max_streams = opts.streams.iter().copied().max().unwrap_or(0);
    let nofile = sys::raise_nofile(max_streams as u64 + 8192)?;
    if (nofile as usize) < max_streams + 512 {
        bail!("RLIMIT_NOFILE can only be raised to {nofile}, too few for {max_streams} idle streams (lower --streams)");
    }
    let dir = TempDir::new("tunnel")?;
    let topo = Topo::new()?;
    let mut md = String::new();
    md.push_str(&format!(
        "## Tunnel benches\n\nOne veth pair between two namespaces; bulk = one TCP stream downloading from the server side for {} s \
         (after 1 s warm-up); cipher {}; guard {}; RLIMIT_NOFILE {nofile}. CPU % is utime+stime of each daemon process \
         (for plain TCP: the reading and writing threads); CPU/MB counts both sides. Daemons: {}.\n\n",
        opts.secs,
        if opts.cryptos.iter().any(|c| c == "noise") {
            "aes (kcp-go) and noise (paqet-dp's authenticated wire) side by side; the idle-stream (RSS) runs use aes"
        } else {
            "aes"
        },
        if opts.guard { "on" } else { "off (upstream's exact wire)" },
        match daemon_cpus(opts) {
            Some((s, c)) => format!(
                "server on CPU {s}, client on CPU {c} (`taskset`, as two hosts would give each its own core; the traffic \
                 endpoints float)"
            ),
            None => "sharing all CPUs with the traffic endpoints (`--share-cpus` or one CPU)".to_string(),
        }
    ));

    // Plain TCP: with TX offloads on (the kernel default) and off (the setting the tunnel runs with).
    eprintln!("bench: plain TCP over the veth");
    topo.tx_offload(true)?;
    let plain_offload = bulk(&topo, Front::Direct, opts.secs, None)?;
    topo.tx_offload(false)?;
    let plain = bulk(&topo, Front::Direct, opts.secs, None)?;
    let direct_lat = latency(&topo, Front::Direct, opts.latency_n)?;

    // Each row: (label, Some((result, plain TCP measured just before it))).
    let mut bulk_rows: Vec<(String, Option<(Bulk, Bulk)>)> = vec![
        (
            "plain TCP, veth TX offloads off (baseline)".to_string(),
            Some((plain, plain)),
        ),
        (
            "plain TCP, veth TX offloads on (kernel default)".to_string(),
            Some((plain_offload, plain)),
        ),
    ];
    let mut lat_rows: Vec<(String, Result<Latency>, Option<Latency>)> =
        vec![("direct TCP".into(), Ok(direct_lat), None)];
    let mut rss_rows: Vec<(String, usize, Result<Rss>)> = Vec::new();
    let mut flood_rows: Vec<(String, Result<Flood>)> = Vec::new();
    let mut mode_rows: Vec<(String, Option<(Bulk, Bulk)>)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut fronts: Vec<String> = Vec::new();
    let mut loss_notes: Vec<String> = Vec::new();

    eprintln!("bench: kcptun reference (fast3, 2048-packet windows)");
    let kcptun = kcptun_bulk(&topo, opts).map(|k| {
        let p = bulk(&topo, Front::Direct, opts.secs, None);
        k.and_then(|k| Ok((k, p?)))
    });

    for (mi, mode) in opts.modes.iter().enumerate() {
        topo.stack_drop(mode != UPSTREAM_RULES)?;
        let many = opts.ccs.len() > 1;
        let many_cryptos = opts.cryptos.len() > 1;
        let cryptos = if opts.cryptos.is_empty() {
            vec!["aes".to_string()]
        } else {
            opts.cryptos.clone()
        };
        for (k, first_cc) in opts.ccs.iter().enumerate().flat_map(|(i, cc)| {
            cryptos.iter().enumerate().flat_map(move |(j, crypto)| {
                CONFIGS.map(|k| (k.with_cc(cc).with_crypto(crypto), i == 0 && j == 0))
            })
        }) {
            let label = format!("{mode} / {}", k.name(many, many_cryptos));
            eprintln!("bench: {label}");
            // Plain TCP right before, with no daemon running (an attached XDP program changes how the veth
            // carries plain TCP too), so each ratio compares figures taken under the same machine load.
            let plain_now = bulk(&topo, Front::Direct, opts.secs, None);
            let mut pair = match Pair::start(&topo, opts, &dir, mode, k) {
                Ok(p) => p,
                Err(e) => {
                    notes.push(format!("{label}: the tunnel did not come up: {e:#}"));
                    bulk_rows.push((label.clone(), None));
                    if k.wnd.is_some() && first_cc {
                        mode_rows.push((mode.clone(), None));
                    }
                    continue;
                }
            };
            let front_note = format!("{label}: {}", pair.front.name());
            fronts.push(front_note);
            let b = plain_now.and_then(|p| {
                let b = bulk(&topo, pair.front, opts.secs, Some(pair.pids()))?;
                pair.alive()?;
                Ok((b, p))
            });
            match b {
                Ok(b) => {
                    if k.wnd.is_some() && first_cc {
                        mode_rows.push((mode.clone(), Some(b)));
                    }
                    bulk_rows.push((label.clone(), Some(b)));
                }
                Err(e) => {
                    notes.push(format!("{label}: bulk failed: {e:#}"));
                    bulk_rows.push((label.clone(), None));
                    if k.wnd.is_some() && first_cc {
                        mode_rows.push((mode.clone(), None));
                    }
                }
            }
            // What the transfer cost in losses: capture drops and KCP retransmissions of both daemons.
            let (mc, ms) = (scrape(&topo.ns_c), scrape(&topo.ns_s));
            let count = |t: &Option<String>, name: &str, label: &str| {
                t.as_deref()
                    .and_then(|t| metric(t, name, label))
                    .map_or("n/a".to_string(), |v| format!("{v:.0}"))
            };
            loss_notes.push(format!(
                "| {label} | {} | {} | {} / {} / {} | {} / {} / {} |",
                count(&mc, "paqet_pcap_kernel_drops_total", "ps_drop"),
                count(&ms, "paqet_pcap_kernel_drops_total", "ps_drop"),
                count(&ms, "paqet_kcp_retransmissions_total", "timeout"),
                count(&ms, "paqet_kcp_retransmissions_total", "fast"),
                count(&ms, "paqet_kcp_retransmissions_total", "early"),
                count(&mc, "paqet_kcp_retransmissions_total", "timeout"),
                count(&mc, "paqet_kcp_retransmissions_total", "fast"),
                count(&mc, "paqet_kcp_retransmissions_total", "early"),
            ));
            // Direct TCP again at the same moment, so the two latencies share the machine's current noise.
            let direct_now = latency(&topo, Front::Direct, opts.latency_n).ok();
            let tunnel_lat = latency(&topo, pair.front, opts.latency_n);
            lat_rows.push((
                format!("{label} ({})", pair.front.name()),
                tunnel_lat,
                direct_now,
            ));
            if mi == 0 && first_cc {
                let idle = match IdleTarget::spawn(&topo.ns_s) {
                    Ok(i) => i,
                    Err(e) => {
                        notes.push(format!("{label}: no idle target: {e:#}"));
                        continue;
                    }
                };
                let mut held = Vec::new();
                let mut streams = opts.streams.clone();
                streams.sort_unstable();
                for n in streams {
                    eprintln!("bench: {label}: {n} idle streams");
                    let r = rss_at(&topo, &mut pair, &idle, &mut held, n);
                    let failed = !matches!(&r, Ok(x) if x.reached >= n);
                    rss_rows.push((format!("{label} ({})", pair.front.name()), n, r));
                    if failed {
                        break;
                    }
                }
                drop(held);
                drop(idle);
                std::thread::sleep(Duration::from_secs(1));
            }
            if k.wnd.is_some() && first_cc && opts.flood_secs > 0 {
                eprintln!("bench: {label}: small-packet flood");
                flood_rows.push((mode.clone(), flood(&topo, &pair, opts.flood_secs)));
            }
            drop(pair);
        }
    }

    // ---- rendering ----
    md.push_str(&format!(
        "Front end used per run: {}.\n\n",
        if fronts.is_empty() {
            "none (no tunnel came up)".into()
        } else {
            fronts.join("; ")
        }
    ));
    md.push_str(
        "### Bulk throughput\n\nEvery tunnel row is paired with plain TCP measured on the same veth just before its daemons started; \
         the ratios use that pair (the machine's load changes over a run).\n\n\
         | path | MB/s | plain TCP just before, MB/s | % of plain TCP | client CPU % | server CPU % | CPU ms per MB | CPU/MB vs plain TCP |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (l, b) in &bulk_rows {
        match b {
            Some((b, p)) => md.push_str(&format!(
                "| {l} | {:.1} | {:.1} | {:.2} % | {:.0} | {:.0} | {:.2} | {:.2}× |\n",
                b.mb_per_s,
                p.mb_per_s,
                b.mb_per_s / p.mb_per_s * 100.0,
                b.cpu_pct.0,
                b.cpu_pct.1,
                b.cpu_ms_per_mb,
                b.cpu_ms_per_mb / p.cpu_ms_per_mb
            )),
            None => md.push_str(&format!("| {l} | failed | | | | | | |\n")),
        }
    }
    md.push_str(&format!(
        "\nUpstream paqet on this machine kind (issue 3): {UPSTREAM_FAST_PCT} % of plain TCP in fast, {UPSTREAM_FAST3_PCT} % in fast3 \
         with 2048-packet windows. Targets (pcap): fast ≥ 5 %, fast3/2048 ≥ 25 %; XDP fast3/2048 ≥ 35 %.\n"
    ));
    for (l, b) in &bulk_rows[2..] {
        if let Some((b, p)) = b {
            let pct = b.mb_per_s / p.mb_per_s * 100.0;
            let target = if l.contains("xdp") && l.contains("fast3") {
                35.0
            } else if l.contains("fast3") {
                25.0
            } else {
                5.0
            };
            md.push_str(&format!(
                "- {l}: {pct:.2} % of plain TCP, target ≥ {target} %: {}\n",
                if pct >= target { "met" } else { "NOT met" }
            ));
        }
    }

    if !loss_notes.is_empty() {
        md.push_str(
            "\nLosses behind the bulk figures (counters since the daemons started, read right after each bulk run):\n\n\
             | path | client pcap ps_drop | server pcap ps_drop | server KCP retransmissions timeout / fast / early | client KCP retransmissions timeout / fast / early |\n|---|---|---|---|---|\n",
        );
        for l in &loss_notes {
            md.push_str(l);
            md.push('\n');
        }
    }

    md.push_str(
        "\n### Go reference: kcptun (fast3, 2048-packet windows)\n\n\
         Debian's kcptun is kcp-go + smux v2 with kcp-go's AES-CFB framing, the protocol core upstream paqet is built \
         on, carried over UDP sockets instead of pcap; same cipher, KCP mode, windows, veth and CPU placement, no FEC, \
         no compression. Upstream paqet adds its pcap capture and injection on top, so its CPU per MB is at least \
         this core's. Plain TCP measured right after it.\n\n",
    );
    match &kcptun {
        None => md.push_str("kcptun is not installed (`apt-get install kcptun`): not measured.\n"),
        Some(Err(e)) => md.push_str(&format!("kcptun run failed: {e:#}\n")),
        Some(Ok((k, p))) => {
            md.push_str(
                "| path | MB/s | plain TCP, MB/s | % of plain TCP | client CPU % | server CPU % | CPU ms per MB |\n|---|---|---|---|---|---|---|\n",
            );
            md.push_str(&format!(
                "| kcptun (kcp-go + smux, UDP) | {:.1} | {:.1} | {:.2} % | {:.0} | {:.0} | {:.2} |\n\n",
                k.mb_per_s,
                p.mb_per_s,
                k.mb_per_s / p.mb_per_s * 100.0,
                k.cpu_pct.0,
                k.cpu_pct.1,
                k.cpu_ms_per_mb
            ));
            for (l, b) in bulk_rows.iter().skip(2) {
                if let Some((b, _)) = b.as_ref().filter(|_| l.contains("fast3")) {
                    md.push_str(&format!(
                        "- {l}: {:.2} CPU ms per MB = {:.2}× kcptun's ({})\n",
                        b.cpu_ms_per_mb,
                        b.cpu_ms_per_mb / k.cpu_ms_per_mb,
                        if b.cpu_ms_per_mb < k.cpu_ms_per_mb {
                            "less CPU per MB than upstream's core"
                        } else {
                            "NOT less"
                        }
                    ));
                }
            }
        }
    }

    md.push_str(&format!(
        "\n### Request latency (new connection + {REQ}-byte request and reply, {} requests)\n\n\
         | path | p50 ms | p90 ms | p99 ms | failed | direct TCP p50 / p99 ms, measured just before |\n|---|---|---|---|---|---|\n",
        opts.latency_n
    ));
    for (l, r, d) in &lat_rows {
        let d = d
            .as_ref()
            .map(|d| format!("{:.3} / {:.3}", d.p50, d.p99))
            .unwrap_or_else(|| "-".into());
        match r {
            Ok(x) => md.push_str(&format!(
                "| {l} | {:.3} | {:.3} | {:.3} | {}/{} | {d} |\n",
                x.p50, x.p90, x.p99, x.failures, x.n
            )),
            Err(e) => md.push_str(&format!("| {l} | failed: {e:#} | | | | {d} |\n")),
        }
    }
    md.push_str("\nUpstream: p50 61 ms (fast), 1.25 ms (fast3), direct 0.19 ms. Target: p50 ≤ 2 ms in every mode.\n");
    for (l, r, _) in &lat_rows[1..] {
        if let Ok(x) = r {
            md.push_str(&format!(
                "- {l}: p50 {:.3} ms: {}\n",
                x.p50,
                if x.p50 <= 2.0 { "met" } else { "NOT met" }
            ));
        }
    }

    md.push_str("\n### Memory with idle streams (VmRSS)\n\n| run | idle streams | client MiB | server MiB | target |\n|---|---|---|---|---|\n");
    for (l, n, r) in &rss_rows {
        let target = if *n <= 1000 { 32.0 } else { 128.0 };
        match r {
            Ok(x) => {
                let (c, s) = (mib(x.client_kib), mib(x.server_kib));
                let verdict = if x.reached < *n {
                    format!(
                        "incomplete: only {} of {n} streams reached the target within 180 s",
                        x.reached
                    )
                } else if c <= target && s <= target {
                    "met".into()
                } else {
                    "NOT met".into()
                };
                md.push_str(&format!(
                    "| {l} | {n} | {c:.1} | {s:.1} | ≤ {target} MiB: {verdict} |\n"
                ));
            }
            Err(e) => md.push_str(&format!("| {l} | {n} | failed: {e:#} | | |\n")),
        }
    }
    md.push_str("\nUpstream: 47 MiB (client) and 58 MiB (server) at 1,000 idle streams; 149 and 172 MiB at 5,000.\n");

    if opts.modes.len() > 1 {
        // pcap's share of its own plain-TCP pair: dividing shares cancels the load drift between runs.
        let base = mode_rows
            .iter()
            .find(|(m, _)| m == "pcap")
            .and_then(|(_, b)| b.as_ref().copied());
        md.push_str("\n### Data-path modes (fast3, 2048-packet windows)\n\n`pcap` runs with the host rules `paqet-dp --manage-firewall` applies (upstream's NOTRACK/RST rules plus a raw PREROUTING DROP); `pcap-upstream-rules` with upstream's three rules only, so the kernel's stack still processes every tunnel packet.\n\n| mode | MB/s | × pcap MB/s | × pcap (share of plain TCP vs pcap's) | % of plain TCP | CPU ms per MB | × pcap CPU/MB |\n|---|---|---|---|---|---|---|\n");
        for (m, b) in &mode_rows {
            match b {
                Some((b, p)) => md.push_str(&format!(
                        "| {m} | {:.1} | {} | {} | {:.2} % | {:.2} | {} |\n",
                        b.mb_per_s,
                        fmt_opt(base.map(|(pb, _)| b.mb_per_s / pb.mb_per_s), 2),
                        fmt_opt(
                            base.map(
                                |(pb, pp)| (b.mb_per_s / p.mb_per_s) / (pb.mb_per_s / pp.mb_per_s)
                            ),
                            2
                        ),
                        b.mb_per_s / p.mb_per_s * 100.0,
                        b.cpu_ms_per_mb,
                        fmt_opt(base.map(|(pb, _)| b.cpu_ms_per_mb / pb.cpu_ms_per_mb), 2)
                    )),
                None => md.push_str(&format!("| {m} | failed | | | | | |\n")),
            }
        }
        md.push_str("\nTargets: XDP ≥ 1.3× pcap throughput and ≤ 0.8× its CPU per MB.\n");
        for base_mode in ["pcap", UPSTREAM_RULES] {
            let Some((pb, pp)) = mode_rows
                .iter()
                .find(|(m, _)| m == base_mode)
                .and_then(|(_, b)| b.as_ref().copied())
            else {
                continue;
            };
            for (m, b) in mode_rows.iter().filter(|(m, _)| m.starts_with("xdp")) {
                let Some((b, p)) = b else { continue };
                let (raw, share) = (
                    b.mb_per_s / pb.mb_per_s,
                    (b.mb_per_s / p.mb_per_s) / (pb.mb_per_s / pp.mb_per_s),
                );
                let cpu = b.cpu_ms_per_mb / pb.cpu_ms_per_mb;
                md.push_str(&format!(
                    "- {m} vs {base_mode}: throughput {raw:.2}× (MB/s), {share:.2}× (share of plain TCP); CPU per MB {cpu:.2}×: {}\n",
                    if raw.min(share) >= 1.3 && cpu <= 0.8 { "met" } else { "NOT met" }
                ));
            }
        }
    }

    if !flood_rows.is_empty() {
        md.push_str(&format!(
            "\n### Small-packet rate into the server ({}-byte payload frames at the tunnel port for {} s)\n\n\
             | mode | sent/s | veth rx/s | daemon rx/s (metrics) | XDP seen/s | server CPU % | frames per CPU-second |\n|---|---|---|---|---|---|---|\n",
            flood::PAYLOAD,
            opts.flood_secs
        ));
        for (m, r) in &flood_rows {
            match r {
                Ok(f) => md.push_str(&format!(
                    "| {m} | {:.0} | {:.0} | {} | {} | {:.0} | {} |\n",
                    f.sent_per_s,
                    f.kernel_rx_per_s,
                    fmt_opt(f.daemon_rx_per_s, 0),
                    fmt_opt(f.xdp_seen_per_s, 0),
                    f.server_cpu_pct,
                    fmt_opt(f.per_core, 0)
                )),
                Err(e) => md.push_str(&format!("| {m} | failed: {e:#} | | | | | |\n")),
            }
        }
        md.push_str(
            "\n`n/a` in the daemon column: the server served no `/metrics` (its `paqet_packets_total{direction=\"rx\"}` counter \
             is what is counted). Frames per CPU-second = daemon rx / server process CPU seconds.\n",
        );
    }
    if !notes.is_empty() {
        md.push_str("\n### Problems\n\n");
        for n in &notes {
            md.push_str(&format!("- {}\n", n.replace('\n', "\n  ")));
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_matching_samples() {
        let t = "# HELP x\npaqet_packets_total{direction=\"rx\"} 15\npaqet_packets_total{direction=\"tx\"} 7\npaqet_packets_totalx 99\n";
        assert_eq!(
            metric(t, "paqet_packets_total", "direction=\"rx\""),
            Some(15.0)
        );
        assert_eq!(metric(t, "paqet_packets_total", ""), Some(22.0));
        assert_eq!(metric(t, "paqet_guard_drops_total", ""), None);
    }

    #[test]
    fn noise_configs_replace_the_key_with_noise_keys() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let k = CONFIGS[1].with_crypto("noise");
        let s = server_config("v0", ip, k, false);
        assert!(
            s.contains("block = \"noise\"\n") && !s.contains("\nkey = "),
            "{s}"
        );
        assert!(
            s.contains(&format!("client_public_keys = [\"{NOISE_CLIENT_PUBLIC}\"]")),
            "{s}"
        );
        let c = client_config("v1", Ipv4Addr::new(10, 0, 0, 1), ip, k, false);
        assert!(
            c.contains(&format!("server_public_key = \"{NOISE_SERVER_PUBLIC}\"")),
            "{c}"
        );
        assert_eq!(k.name(false, true), "fast3, 2048-packet windows, noise");
        // aes stays byte for byte the old config
        assert_eq!(
            server_config("v0", ip, CONFIGS[1].with_crypto("aes"), false),
            server_toml("v0", ip, MAC_C, &kcp_lines(CONFIGS[1], true), false)
        );
    }

    #[test]
    fn configs_name_the_mode_and_windows() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let s = server_config("v0", ip, CONFIGS[1], false);
        assert!(
            s.contains("mode = \"fast3\"\ncc = \"bbr\"\nsndwnd = 2048\nrcvwnd = 2048\nblock"),
            "{s}"
        );
        let c = client_config(
            "v1",
            Ipv4Addr::new(10, 0, 0, 1),
            ip,
            CONFIGS[0].with_cc("off"),
            true,
        );
        assert!(
            c.contains("mode = \"fast\"\ncc = \"off\"\nsndwnd = 128\nrcvwnd = 512\nblock")
                && c.contains("guard = true"),
            "{c}"
        );
        assert!(
            server_config("v0", ip, CONFIGS[0], false).contains("sndwnd = 1024\nrcvwnd = 1024\n")
        );
        assert_eq!(c.matches("[[forward]]").count(), 3);
    }
}
