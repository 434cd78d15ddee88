//! Shared support for the end-to-end tests that run the real `paqet-dp` binary (root only).
//!
//! - [`Net`]: a client and a server namespace joined directly by a veth pair, or routed through a middle
//!   namespace with an impaired link ([`ImpairedLink`]); unique names with the pid, TX offload off.
//! - [`HttpServer`] / [`UdpEcho`]: services on the server namespace's loopback, run by threads of this
//!   process that entered the namespace. The HTTP server generates deterministic content
//!   (`GET /gen/SEED/LEN`), holds requests until released (`GET /hold/SEED/LEN`, for the limit tests) and
//!   hashes uploads (`PUT|POST /upload` answers the sha256 of the body).
//! - [`Daemon`]: one `paqet-dp run` child with its log file, SIGTERM then SIGKILL on drop.
//! - [`Tunnel`]: everything above wired together from [`Opts`], with a bounded readiness wait.
//! - [`MODES`]: the data-path mode pairs every test runs with (extend it for XDP).
//!
//! Every wait is bounded; nothing is sent anywhere but loopback and the test's own namespaces.
#![allow(dead_code)] // every test binary uses a different subset

pub mod raw;
pub mod tunlink;

use std::io::{BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use paqet::tools::firewall::{self, FirewallRole};
use paqet_testkit::impair::{ImpairedLink, LinkSpec};
use paqet_testkit::netns::{is_root, Netns, VethPair};
use sha2::{Digest, Sha256};

pub mod v6;

/// The daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_paqet-dp");

/// The `paqet-dp` binary the tests run: `$PAQET_DP_BIN` when set (e.g. a copy built with the XDP program,
/// safe from concurrent rebuilds of the shared target directory), else the one cargo built ([`BIN`]).
pub fn bin() -> String {
    std::env::var("PAQET_DP_BIN").unwrap_or_else(|_| BIN.to_owned())
}
/// The shared secret both daemons use unless a test says otherwise.
pub const KEY: &str = "paqet-dp-e2e-test-key";
/// The server's tunnel port.
pub const TUNNEL_PORT: u16 = 9999;
/// Metrics / health port (loopback of each namespace).
pub const METRICS_PORT: u16 = 9100;

/// A data path a daemon can run with (`paqet-dp run --mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pcap,
    XdpNative,
    XdpGeneric,
}

impl Mode {
    /// The `--mode` argument.
    pub fn arg(self) -> &'static str {
        match self {
            Mode::Pcap => "pcap",
            Mode::XdpNative => "xdp-native",
            Mode::XdpGeneric => "xdp-generic",
        }
    }

    /// Whether the host needs the iptables NOTRACK / RST rules (the kernel sees tunnel packets).
    pub fn needs_firewall(self) -> bool {
        self == Mode::Pcap
    }

    /// The mode of a second daemon on the same interface as a daemon running in `self`: only one XDP
    /// program can be attached per interface (a second XDP attach fails with EBUSY), so next to an XDP
    /// daemon the extra one runs in pcap mode. One XDP daemon per interface; an XDP client steers only
    /// its own session ports, so a pcap client next to it keeps receiving its frames.
    pub fn beside(self) -> Mode {
        match self {
            Mode::Pcap | Mode::XdpNative | Mode::XdpGeneric => Mode::Pcap,
        }
    }
}

/// `(server mode, client mode)` pairs every end-to-end test runs with: pcap, XDP native, XDP generic, and
/// mixed pairs (an XDP server with a pcap client and the other way round).
pub const MODES: &[(Mode, Mode)] = &[
    (Mode::Pcap, Mode::Pcap),
    (Mode::XdpNative, Mode::XdpNative),
    (Mode::XdpGeneric, Mode::XdpGeneric),
    (Mode::XdpNative, Mode::Pcap),
    (Mode::Pcap, Mode::XdpGeneric),
];

/// True (after printing why) when the test must be skipped: not root, or a tool it needs is missing.
pub fn skip(test: &str, tools: &[&str]) -> bool {
    if !is_root() {
        eprintln!("skipped {test}: needs root (network namespaces, pcap, iptables)");
        return true;
    }
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            eprintln!("skipped {test}: `{t}` is not installed");
            return true;
        }
    }
    false
}

/// Serialises the heavy tests of one test binary (the machine has two cores; parallel bulk transfers would
/// only make every bounded wait fragile).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/paqet-e2e-<pid>-<tag>`, fresh.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("paqet-e2e-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------------------------------------

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` with the bytes of content `seed` starting at byte `offset` (random access, no state).
pub fn fill_pattern(seed: u64, offset: u64, out: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < out.len() {
        let word = splitmix(seed.rotate_left(32) ^ (pos / 8)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// Hex sha256 of `len` bytes of content `seed`.
pub fn pattern_sha256(seed: u64, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill_pattern(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex::encode(h.finalize())
}

/// Writes `len` bytes of content `seed` to `path`; returns its hex sha256.
pub fn write_pattern_file(path: &Path, seed: u64, len: u64) -> String {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create upload file"));
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill_pattern(seed, off, &mut buf[..n]);
        f.write_all(&buf[..n]).expect("write upload file");
        off += n as u64;
    }
    f.flush().expect("flush upload file");
    pattern_sha256(seed, len)
}

/// Writes `data` to `c` on a second thread while reading as many bytes back (an echo through the tunnel in
/// both directions at once); returns what came back. `c`'s timeouts bound both directions.
pub fn echo_exchange(c: &TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut w = c.try_clone()?;
    let out = data.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&out));
    let mut got = vec![0u8; data.len()];
    (&mut &*c).read_exact(&mut got)?;
    writer.join().expect("echo writer thread")?;
    Ok(got)
}

/// `len` bytes of content `seed` (see [`fill_pattern`]) in a new buffer.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(seed, 0, &mut v);
    v
}

/// Runs `f` on a thread inside `ns` and returns its result.
pub fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    ns.spawn(f)
        .join()
        .expect("namespace thread panicked")
        .unwrap_or_else(|e| panic!("cannot enter namespace {}: {e}", ns.name()))
}

// ---------------------------------------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------------------------------------

enum Link {
    // Field order = drop order: the veth before its namespaces.
    Direct {
        _veth: VethPair,
        client: Netns,
        server: Netns,
    },
    Impaired(Box<ImpairedLink>),
    /// A tun pair and its relay (no link header): [`tunlink`].
    Tun(tunlink::TunLink),
}

/// The client and server namespaces and how they are joined.
pub struct Net {
    link: Link,
    /// The client's interface, address and next hop's MAC.
    pub client_if: String,
    pub client_ip: Ipv4Addr,
    pub client_gw_mac: String,
    /// The server's interface, address and next hop's MAC.
    pub server_if: String,
    pub server_ip: Ipv4Addr,
    pub server_gw_mac: String,
}

/// The MAC address of `dev` inside `ns`.
pub fn if_mac(ns: &Netns, dev: &str) -> String {
    ns.exec(&["cat", &format!("/sys/class/net/{dev}/address")])
        .unwrap_or_else(|e| panic!("MAC of {dev} in {}: {e}", ns.name()))
        .trim()
        .to_owned()
}

/// The interface of `ns` that carries address `ip`.
pub fn if_with_addr(ns: &Netns, ip: Ipv4Addr) -> String {
    let out = ns
        .exec(&["ip", "-o", "-4", "addr", "show"])
        .expect("ip addr show");
    out.lines()
        .find(|l| l.contains(&format!(" {ip}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no interface with {ip} in {}:\n{out}", ns.name()))
        .to_owned()
}

impl Net {
    /// Client and server namespaces joined by one veth pair. `tag` (≤ 4 bytes) must be unique per test.
    pub fn direct(tag: &str) -> Net {
        Self::direct_queues(tag, 1)
    }

    /// Like [`direct`](Self::direct), with `queues` RX/TX queues on both veth ends (`ethtool -L`, set before
    /// the addresses) when more than one.
    pub fn direct_queues(tag: &str, queues: u32) -> Net {
        let pid = std::process::id();
        let client = Netns::new(&format!("{tag}c")).expect("client netns");
        let server = Netns::new(&format!("{tag}s")).expect("server netns");
        let (cif, sif) = (format!("{tag}{pid}c"), format!("{tag}{pid}s"));
        let veth = VethPair::new(&cif, &sif, &client, &server).expect("veth pair");
        if queues > 1 {
            let q = queues.to_string();
            for (ns, dev) in [(&client, &cif), (&server, &sif)] {
                ns.exec(&["ethtool", "-L", dev, "rx", &q, "tx", &q])
                    .unwrap_or_else(|e| panic!("ethtool -L {dev} rx {q} tx {q}: {e}"));
            }
        }
        let (cip, sip) = (Ipv4Addr::new(10, 216, 0, 1), Ipv4Addr::new(10, 216, 0, 2));
        veth.configure(
            &client,
            &server,
            &format!("{cip}/24"),
            &format!("{sip}/24"),
            true,
        )
        .expect("veth addresses / ethtool -K tx off");
        let client_mac = if_mac(&client, &cif);
        let server_mac = if_mac(&server, &sif);
        Net {
            link: Link::Direct {
                _veth: veth,
                client,
                server,
            },
            client_if: cif,
            client_ip: cip,
            client_gw_mac: server_mac,
            server_if: sif,
            server_ip: sip,
            server_gw_mac: client_mac,
        }
    }

    /// Client (A) and server (B) routed through a middle namespace M that impairs the path per `spec`.
    pub fn impaired(tag: &str, spec: LinkSpec) -> Net {
        // The NFQUEUE relay runs on a thread of this test process inside M, stopped when the link drops.
        let link = ImpairedLink::new(tag, spec).expect("impaired link");
        let m_a_if = if_with_addr(&link.m, link.m_a_ip);
        let m_b_if = if_with_addr(&link.m, link.m_b_ip);
        let client_gw_mac = if_mac(&link.m, &m_a_if);
        let server_gw_mac = if_mac(&link.m, &m_b_if);
        Net {
            client_if: link.a_if.clone(),
            client_ip: link.a_ip,
            client_gw_mac,
            server_if: link.b_if.clone(),
            server_ip: link.b_ip,
            server_gw_mac,
            link: Link::Impaired(Box::new(link)),
        }
    }

    pub fn client(&self) -> &Netns {
        match &self.link {
            Link::Direct { client, .. } => client,
            Link::Impaired(l) => &l.a,
            Link::Tun(l) => &l.client,
        }
    }

    pub fn server(&self) -> &Netns {
        match &self.link {
            Link::Direct { server, .. } => server,
            Link::Impaired(l) => &l.b,
            Link::Tun(l) => &l.server,
        }
    }

    /// The middle (router) namespace of an impaired link: a third party on the path.
    pub fn middle(&self) -> Option<&Netns> {
        match &self.link {
            Link::Direct { .. } | Link::Tun(_) => None,
            Link::Impaired(l) => Some(&l.m),
        }
    }

    /// The server's tunnel address.
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.server_ip, TUNNEL_PORT))
    }

    /// Appends the iptables NOTRACK / RST-drop rules each side needs (spec §2.4, both roles).
    pub fn apply_firewall(&self, server: bool, client: bool) {
        let mut todo = Vec::new();
        if server {
            todo.push((
                self.server(),
                FirewallRole::Server {
                    port: TUNNEL_PORT,
                    ipv4: true,
                    ipv6: false,
                },
            ));
        }
        if client {
            todo.push((
                self.client(),
                FirewallRole::Client {
                    server: self.server_addr(),
                    local_ports: vec![],
                },
            ));
        }
        for (ns, role) in todo {
            for r in firewall::rules(&role) {
                let mut cmd = vec![r.family.program().to_owned()];
                cmd.extend(r.args("-A"));
                let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
                ns.exec(&cmd).unwrap_or_else(|e| panic!("{r}: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Services in the server namespace
// ---------------------------------------------------------------------------------------------------------

/// Shared state of the HTTP server's `/hold` requests.
#[derive(Default)]
pub struct HoldGate {
    /// Requests currently held.
    pub held: AtomicUsize,
    /// Set to let every held request proceed.
    pub release: AtomicBool,
}

/// The HTTP test server on the server namespace's loopback.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub gate: Arc<HoldGate>,
}

/// Upper bound of a `/hold` wait.
const HOLD_MAX: Duration = Duration::from_secs(60);

impl HttpServer {
    pub fn start(ns: &Netns) -> HttpServer {
        let gate = Arc::new(HoldGate::default());
        let g = gate.clone();
        let addr = in_ns(ns, move || {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind HTTP server");
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(c) = c else { continue };
                    let g = g.clone();
                    std::thread::spawn(move || {
                        let _ = serve_http(c, &g);
                    });
                }
            });
            addr
        });
        HttpServer { addr, gate }
    }

    /// `http://127.0.0.1:PORT{path}` (as seen from the server side).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn respond_head(c: &mut TcpStream, status: &str, len: u64) -> std::io::Result<()> {
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )
}

fn respond_text(c: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    respond_head(c, status, body.len() as u64)?;
    c.write_all(body.as_bytes())
}

fn serve_gen(c: &mut TcpStream, seed: u64, len: u64) -> std::io::Result<()> {
    respond_head(c, "200 OK", len)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill_pattern(seed, off, &mut buf[..n]);
        c.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// One request per connection: `GET /ping`, `GET /gen/SEED/LEN`, `GET /hold/SEED/LEN`, `PUT|POST /upload`.
fn serve_http(mut c: TcpStream, gate: &HoldGate) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 4096];
    let body_start;
    loop {
        let n = c.read(&mut byte)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&byte[..n]);
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            body_start = p + 4;
            break;
        }
        if head.len() > 16 * 1024 {
            return respond_text(&mut c, "431 Request Header Fields Too Large", "");
        }
    }
    let text = String::from_utf8_lossy(&head[..body_start]).into_owned();
    let mut lines = text.lines();
    let mut req = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (req.next().unwrap_or(""), req.next().unwrap_or(""));
    // Through the HTTP proxy the request arrives in origin form; accept absolute form too.
    let path = target
        .strip_prefix("http://")
        .map(|r| &r[r.find('/').unwrap_or(r.len())..])
        .unwrap_or(target);
    let header = |name: &str| {
        text.lines().skip(1).find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        })
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let nums = |i: usize| parts.get(i).and_then(|s| s.parse::<u64>().ok());
    match (method, parts.first().copied()) {
        ("GET", Some("ping")) => respond_text(&mut c, "200 OK", "pong"),
        ("GET", Some("gen")) => match (nums(1), nums(2)) {
            (Some(seed), Some(len)) => serve_gen(&mut c, seed, len),
            _ => respond_text(&mut c, "400 Bad Request", "want /gen/SEED/LEN"),
        },
        ("GET", Some("hold")) => match (nums(1), nums(2)) {
            (Some(seed), Some(len)) => {
                gate.held.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + HOLD_MAX;
                while !gate.release.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let r = serve_gen(&mut c, seed, len);
                gate.held.fetch_sub(1, Ordering::SeqCst);
                r
            }
            _ => respond_text(&mut c, "400 Bad Request", "want /hold/SEED/LEN"),
        },
        ("PUT" | "POST", Some("upload")) => {
            let Some(len) = header("content-length").and_then(|v| v.parse::<u64>().ok()) else {
                return respond_text(&mut c, "411 Length Required", "");
            };
            if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                c.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            let mut h = Sha256::new();
            let already = &head[body_start..];
            let take = (already.len() as u64).min(len) as usize;
            h.update(&already[..take]);
            let mut left = len - take as u64;
            let mut buf = vec![0u8; 1 << 16];
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = c.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "upload cut short",
                    ));
                }
                h.update(&buf[..n]);
                left -= n as u64;
            }
            respond_text(&mut c, "200 OK", &hex::encode(h.finalize()))
        }
        _ => respond_text(&mut c, "404 Not Found", "unknown path"),
    }
}

/// Starts a TCP echo server (one thread per connection) on the loopback of `ns`; returns its address.
pub fn tcp_echo(ns: &Netns) -> SocketAddr {
    // A socket stays in the namespace it was made in: only the bind needs a thread inside `ns`.
    let l = in_ns(ns, || {
        TcpListener::bind("127.0.0.1:0").expect("bind TCP echo")
    });
    let addr = l.local_addr().expect("TCP echo address");
    std::thread::spawn(move || {
        for mut c in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let Ok(mut w) = c.try_clone() else { return };
                let _ = std::io::copy(&mut c, &mut w);
            });
        }
    });
    addr
}

/// A UDP echo server on the server namespace's loopback.
pub struct UdpEcho {
    pub addr: SocketAddr,
}

impl UdpEcho {
    pub fn start(ns: &Netns) -> UdpEcho {
        let u = in_ns(ns, || {
            UdpSocket::bind("127.0.0.1:0").expect("bind UDP echo")
        });
        let addr = u.local_addr().expect("UDP echo address");
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
        UdpEcho { addr }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Daemons
// ---------------------------------------------------------------------------------------------------------

/// Whether `paqet-dp run` accepts `flag` (probed once from `run --help`).
pub fn run_supports(flag: &str) -> bool {
    static HELP: OnceLock<String> = OnceLock::new();
    let help = HELP.get_or_init(|| {
        Command::new(bin())
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    });
    help.contains(flag)
}

/// A `paqet-dp run` child; SIGTERM then SIGKILL on drop (its log is printed if the test is failing).
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Daemon {
    /// Writes `config` to `DIR/NAME.toml` and starts `paqet-dp run -c` on it inside `ns` with `--mode mode`
    /// (plus `--manage-firewall` when `manage_firewall`); stdout and stderr go to `DIR/NAME.log`.
    pub fn spawn(
        ns: &Netns,
        dir: &Path,
        name: &str,
        config: &str,
        mode: Mode,
        manage_firewall: bool,
    ) -> Daemon {
        let extra: &[&str] = if manage_firewall {
            &["--manage-firewall"]
        } else {
            &[]
        };
        Self::spawn_with(ns, dir, name, config, mode, extra)
    }

    /// Like [`spawn`](Self::spawn) with `extra` arguments after `--mode mode` (e.g. `--manage-firewall`,
    /// `--key-file PATH`).
    pub fn spawn_with(
        ns: &Netns,
        dir: &Path,
        name: &str,
        config: &str,
        mode: Mode,
        extra: &[&str],
    ) -> Daemon {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config).expect("write config");
        // The config holds the key: the daemon refuses a group/world-readable one.
        std::fs::set_permissions(
            &cfg,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .expect("chmod config");
        let mut args = vec![
            "run".to_owned(),
            "-c".into(),
            cfg.to_string_lossy().into_owned(),
            "--mode".into(),
            mode.arg().into(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Self::spawn_args(ns, dir, name, &args)
    }

    /// Starts `paqet-dp ARGS` inside `ns`, logging to `DIR/NAME.log`. The daemon logs at its config's level:
    /// an inherited `PAQET_LOG` (which would override it) is removed, as tests read the log.
    pub fn spawn_args(ns: &Netns, dir: &Path, name: &str, args: &[String]) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log fd");
        let child = ns
            .command(&bin())
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .env_remove("PAQET_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn paqet-dp");
        Daemon {
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid (`ip netns exec` execs in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}):\n{}", self.name, self.log_text());
        }
    }

    /// SIGKILL (a crash, no cleanup).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.terminate();
    }

    /// SIGTERM, then SIGKILL after 5 s; returns whether the process exited by itself (true as well when it
    /// had already exited).
    pub fn terminate(&mut self) -> bool {
        if !self.running() {
            return true;
        }
        // SAFETY: plain kill(2) on our own child's pid (ip netns exec execs in place).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------------------

/// `GET path` on `127.0.0.1:port` inside `ns`: `(status, body)`, or the error text.
pub fn http_get(ns: &Netns, port: u16, path: &str) -> Result<(u16, String), String> {
    let path = path.to_owned();
    in_ns(ns, move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        c.read_to_end(&mut raw)
            .map_err(|e| format!("read {addr}{path}: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("no HTTP status in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// The `/metrics` text of the daemon in `ns`.
pub fn scrape(ns: &Netns) -> String {
    match http_get(ns, METRICS_PORT, "/metrics") {
        Ok((200, body)) => body,
        other => panic!("GET /metrics in {}: {other:?}", ns.name()),
    }
}

/// Sum of the samples of one exact series, e.g. `paqet_xdp_packets_total{counter="malformed"}` (0 when
/// absent, as in pcap mode).
pub fn series_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// Sum of every sample of metric `name` (exact sample name, any labels) in a scrape.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value_part = if rest.starts_with('{') {
                &rest[rest.find('}')? + 1..]
            } else {
                rest
            };
            if !value_part.starts_with(' ') {
                return None;
            }
            value_part.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Retries `f` every 200 ms until it returns `Some` or `within` passes.
pub fn poll<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Retries `f` every 100 ms until it returns `Ok` or `within` passes; then the last error.
pub fn retry<T, E>(within: Duration, mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------------------------

/// How curl reaches the target.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    /// `--socks5-hostname 127.0.0.1:PORT` (name resolved by the proxy).
    Socks5(u16),
    /// `-x http://127.0.0.1:PORT`.
    HttpProxy(u16),
}

/// A curl command in `ns` with a clean environment (no proxy variables), `--max-time max_secs`.
pub fn curl_cmd(ns: &Netns, via: Via, max_secs: u64) -> Command {
    let mut c = curl_direct(ns, max_secs);
    match via {
        Via::Socks5(p) => c.args(["--socks5-hostname", &format!("127.0.0.1:{p}")]),
        Via::HttpProxy(p) => c.args(["-x", &format!("http://127.0.0.1:{p}")]),
    };
    c
}

/// A curl command in `ns` with a clean environment (no proxy variables), `--max-time max_secs`, no proxy.
pub fn curl_direct(ns: &Netns, max_secs: u64) -> Command {
    let mut c = ns.command("curl");
    c.env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .args([
            "-sS",
            "--fail",
            "-H",
            "Expect:",
            "--connect-timeout",
            "10",
            "--max-time",
            &max_secs.to_string(),
        ]);
    c
}

/// Result of a download: bytes and sha256 of what curl wrote, and curl's exit status and stderr.
#[derive(Debug)]
pub struct Fetched {
    pub ok: bool,
    pub len: u64,
    pub sha256: String,
    pub stderr: String,
}

/// Starts `cmd` (a curl writing the body to stdout) and hashes its output as it streams.
pub fn spawn_fetch(mut cmd: Command) -> std::thread::JoinHandle<Fetched> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn curl");
    std::thread::spawn(move || {
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let errt = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut len = 0u64;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            len += n as u64;
        }
        let status = child.wait().expect("wait curl");
        Fetched {
            ok: status.success(),
            len,
            sha256: hex::encode(h.finalize()),
            stderr: errt.join().unwrap_or_default(),
        }
    })
}

/// Downloads `url` with curl in `ns` via `via`.
pub fn fetch(ns: &Netns, via: Via, url: &str, max_secs: u64) -> Fetched {
    let mut c = curl_cmd(ns, via, max_secs);
    c.arg(url);
    spawn_fetch(c).join().expect("fetch thread")
}

/// Uploads `file` (PUT) to `url` with curl in `ns` via `via`; returns curl's output (the server's sha256).
pub fn upload(ns: &Netns, via: Via, url: &str, file: &Path, max_secs: u64) -> Output {
    let mut c = curl_cmd(ns, via, max_secs);
    c.args(["-T", &file.to_string_lossy(), url]);
    c.output().expect("run curl upload")
}

// ---------------------------------------------------------------------------------------------------------
// The tunnel
// ---------------------------------------------------------------------------------------------------------

/// Listener ports of one client daemon (loopback of the client namespace).
#[derive(Clone, Copy, Debug)]
pub struct ClientPorts {
    pub socks: u16,
    pub http: u16,
    /// TCP forward to the HTTP server (used by the readiness probe).
    pub fwd_http: u16,
    /// UDP forward to the UDP echo server.
    pub fwd_udp: u16,
    pub metrics: u16,
}

impl ClientPorts {
    pub const MAIN: ClientPorts = ClientPorts {
        socks: 1080,
        http: 8118,
        fwd_http: 18080,
        fwd_udp: 18053,
        metrics: METRICS_PORT,
    };
    pub const SECOND: ClientPorts = ClientPorts {
        socks: 1081,
        http: 8119,
        fwd_http: 18090,
        fwd_udp: 18063,
        metrics: 9101,
    };
}

/// What a [`Tunnel`] is built with.
#[derive(Clone, Debug)]
pub struct Opts {
    pub server_mode: Mode,
    pub client_mode: Mode,
    /// `None`: direct veth; `Some`: routed through an impaired middle namespace.
    pub link: Option<LinkSpec>,
    /// KCP preset of both sides.
    pub kcp_mode: &'static str,
    /// `sndwnd` = `rcvwnd` on both sides.
    pub wnd: u32,
    /// `transport.conn` of the client.
    pub conn: u32,
    pub server_key: String,
    pub client_key: String,
    pub smuxkalive: u32,
    pub smuxktimeout: u32,
    /// Extra lines appended to the server's `[transport.kcp]` table (limits ...).
    pub server_kcp_extra: String,
    /// Install the iptables NOTRACK/RST rules pcap mode needs (off: to show what happens without them).
    pub firewall: bool,
    /// Join the namespaces with a tun pair (no link header, no `router_mac`) instead of `link`.
    pub tun: bool,
}

impl Opts {
    pub fn new((server_mode, client_mode): (Mode, Mode)) -> Opts {
        Opts {
            server_mode,
            client_mode,
            link: None,
            kcp_mode: "fast3",
            wnd: 1024,
            conn: 2,
            server_key: KEY.into(),
            client_key: KEY.into(),
            smuxkalive: 1,
            smuxktimeout: 8,
            server_kcp_extra: String::new(),
            firewall: true,
            tun: false,
        }
    }
}

/// `router_mac = "MAC"`, or nothing for an interface without MACs (empty `mac`: a tun link).
pub fn router_mac_line(mac: &str) -> String {
    if mac.is_empty() {
        String::new()
    } else {
        format!("router_mac = \"{mac}\"")
    }
}

/// Server and client daemons in their namespaces, with the test services on the server side.
pub struct Tunnel {
    // Field order = drop order: daemons, then namespaces, then files.
    pub client: Daemon,
    pub server: Daemon,
    pub extra: Vec<Daemon>,
    pub http: HttpServer,
    pub udp: UdpEcho,
    pub opts: Opts,
    pub net: Net,
    pub dir: TempDir,
    manage_firewall: bool,
}

/// How long a tunnel may take to carry its first request.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

impl Tunnel {
    /// Builds the network, the services and both daemons from `opts`, then waits until a request goes
    /// through the tunnel. `tag` (≤ 4 bytes) must be unique within the test binary.
    pub fn start(tag: &str, opts: Opts) -> Tunnel {
        Self::start_with(tag, opts, None)
    }

    /// Like [`start`](Self::start); `configs`, when given, produces the (server, client) config texts from the
    /// network, the services and the temp dir instead of [`server_config`](Self::server_config) /
    /// [`client_config`](Self::client_config). The client config must keep the `ClientPorts::MAIN.fwd_http`
    /// TCP forward to the HTTP server (the readiness probe uses it).
    #[allow(clippy::type_complexity)]
    pub fn start_with(
        tag: &str,
        opts: Opts,
        configs: Option<&dyn Fn(&Net, &HttpServer, &UdpEcho, &Path) -> (String, String)>,
    ) -> Tunnel {
        let net = match opts.link {
            _ if opts.tun => Net::tun(tag),
            None => Net::direct(tag),
            Some(spec) => Net::impaired(tag, spec),
        };
        let dir = TempDir::new(tag);
        let http = HttpServer::start(net.server());
        let udp = UdpEcho::start(net.server());
        // The daemons manage their own rules when the binary can; otherwise the test applies them.
        let manage_firewall = opts.firewall && run_supports("--manage-firewall");
        if opts.firewall && !manage_firewall {
            net.apply_firewall(
                opts.server_mode.needs_firewall(),
                opts.client_mode.needs_firewall(),
            );
        }
        let (scfg, ccfg) = match configs {
            Some(f) => f(&net, &http, &udp, dir.path()),
            None => (
                Self::server_config(&net, &opts),
                Self::client_config(
                    &net,
                    &opts,
                    &http,
                    &udp,
                    ClientPorts::MAIN,
                    &opts.client_key,
                ),
            ),
        };
        let server = Daemon::spawn(
            net.server(),
            dir.path(),
            "server",
            &scfg,
            opts.server_mode,
            manage_firewall && opts.server_mode.needs_firewall(),
        );
        let client = Daemon::spawn(
            net.client(),
            dir.path(),
            "client",
            &ccfg,
            opts.client_mode,
            manage_firewall && opts.client_mode.needs_firewall(),
        );
        let mut t = Tunnel {
            client,
            server,
            extra: Vec::new(),
            http,
            udp,
            opts,
            net,
            dir,
            manage_firewall,
        };
        t.wait_ready(READY_WITHIN)
            .unwrap_or_else(|e| panic!("tunnel not ready within {READY_WITHIN:?}: {e}"));
        t
    }

    /// The server's TOML config.
    pub fn server_config(net: &Net, o: &Opts) -> String {
        format!(
            r#"role = "server"
[log]
level = "info"
[listen]
addr = ":{TUNNEL_PORT}"
[network]
interface = "{sif}"
[network.ipv4]
addr = "{sip}:{TUNNEL_PORT}"
{gw}
[transport]
protocol = "kcp"
[transport.kcp]
mode = "{mode}"
sndwnd = {wnd}
rcvwnd = {wnd}
block = "aes"
key = "{key}"
smuxkalive = {ka}
smuxktimeout = {kt}
{extra}
[metrics]
listen = "127.0.0.1:{METRICS_PORT}"
"#,
            sif = net.server_if,
            sip = net.server_ip,
            gw = router_mac_line(&net.server_gw_mac),
            mode = o.kcp_mode,
            wnd = o.wnd,
            key = o.server_key,
            ka = o.smuxkalive,
            kt = o.smuxktimeout,
            extra = o.server_kcp_extra,
        )
    }

    /// A client's TOML config with the listeners of `ports` and key `key`.
    pub fn client_config(
        net: &Net,
        o: &Opts,
        http: &HttpServer,
        udp: &UdpEcho,
        ports: ClientPorts,
        key: &str,
    ) -> String {
        Self::client_config_to(net, o, http.addr, udp.addr, ports, key)
    }

    /// A client's TOML config whose TCP forward (`ports.fwd_http`) goes to `tcp_target` and UDP forward
    /// (`ports.fwd_udp`) to `udp_target`, with the other listeners of `ports` and key `key`.
    pub fn client_config_to(
        net: &Net,
        o: &Opts,
        tcp_target: SocketAddr,
        udp_target: SocketAddr,
        ports: ClientPorts,
        key: &str,
    ) -> String {
        format!(
            r#"role = "client"
[log]
level = "info"
[server]
addr = "{sip}:{TUNNEL_PORT}"
[[socks5]]
listen = "127.0.0.1:{socks}"
[[http]]
listen = "127.0.0.1:{hport}"
[[forward]]
listen = "127.0.0.1:{fwd_http}"
target = "{tcp_target}"
protocol = "tcp"
[[forward]]
listen = "127.0.0.1:{fwd_udp}"
target = "{udp_target}"
protocol = "udp"
[network]
interface = "{cif}"
[network.ipv4]
addr = "{cip}:0"
{gw}
[transport]
protocol = "kcp"
conn = {conn}
[transport.kcp]
mode = "{mode}"
sndwnd = {wnd}
rcvwnd = {wnd}
block = "aes"
key = "{key}"
smuxkalive = {ka}
smuxktimeout = {kt}
[metrics]
listen = "127.0.0.1:{metrics}"
"#,
            sip = net.server_ip,
            socks = ports.socks,
            hport = ports.http,
            fwd_http = ports.fwd_http,
            fwd_udp = ports.fwd_udp,
            metrics = ports.metrics,
            cif = net.client_if,
            cip = net.client_ip,
            gw = router_mac_line(&net.client_gw_mac),
            conn = o.conn,
            mode = o.kcp_mode,
            wnd = o.wnd,
            ka = o.smuxkalive,
            kt = o.smuxktimeout,
        )
    }

    /// Starts another client daemon in the client namespace, on the main client's interface, with `ports`
    /// and `key`. It runs in the main client's mode when that is pcap, and in pcap mode next to an XDP
    /// client ([`Mode::beside`]: one XDP daemon per interface).
    pub fn spawn_client(&self, name: &str, ports: ClientPorts, key: &str) -> Daemon {
        let cfg = Self::client_config(&self.net, &self.opts, &self.http, &self.udp, ports, key);
        let mode = self.opts.client_mode.beside();
        if mode.needs_firewall() && !self.opts.client_mode.needs_firewall() && !self.manage_firewall
        {
            // The tunnel was built without the client's rules (XDP client): the pcap client needs them.
            self.net.apply_firewall(false, true);
        }
        Daemon::spawn(
            self.net.client(),
            self.dir.path(),
            name,
            &cfg,
            mode,
            self.manage_firewall && mode.needs_firewall(),
        )
    }

    /// Starts the server again (after a kill) from the config it ran with, logging to `name`.
    pub fn restart_server(&mut self, name: &str) {
        self.server.kill();
        let cfg =
            std::fs::read_to_string(self.dir.path().join("server.toml")).expect("server config");
        self.server = Daemon::spawn(
            self.net.server(),
            self.dir.path(),
            name,
            &cfg,
            self.opts.server_mode,
            self.manage_firewall && self.opts.server_mode.needs_firewall(),
        );
    }

    /// One `GET /ping` through the client's TCP forward at `fwd_port` (one attempt, 5 s bound).
    pub fn probe(&self, fwd_port: u16) -> Result<(), String> {
        in_ns(self.net.client(), move || {
            let addr = SocketAddr::from(([127, 0, 0, 1], fwd_port));
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut r = String::new();
            BufReader::new(c)
                .read_to_string(&mut r)
                .map_err(|e| format!("read through {addr}: {e}"))?;
            if r.starts_with("HTTP/1.1 200") && r.ends_with("pong") {
                Ok(())
            } else {
                Err(format!("unexpected reply {r:?}"))
            }
        })
    }

    /// Polls [`probe`](Self::probe) on the main forward until it succeeds (checking both daemons are alive).
    pub fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.server.assert_running();
            self.client.assert_running();
            match self.probe(ClientPorts::MAIN.fwd_http) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    }

    /// `http://127.0.0.1:PORT{path}` of the HTTP server (resolved on the server side).
    pub fn url(&self, path: &str) -> String {
        self.http.url(path)
    }

    /// curl via the main client's SOCKS5 listener.
    pub fn socks(&self) -> Via {
        Via::Socks5(ClientPorts::MAIN.socks)
    }

    /// curl via the main client's HTTP proxy listener.
    pub fn http_proxy(&self) -> Via {
        Via::HttpProxy(ClientPorts::MAIN.http)
    }

    /// Downloads `/gen/seed/len` via `via` and asserts it arrived complete and byte-exact.
    pub fn download_checked(&self, via: Via, seed: u64, len: u64, max_secs: u64) -> Duration {
        let t0 = Instant::now();
        let f = fetch(
            self.net.client(),
            via,
            &self.url(&format!("/gen/{seed}/{len}")),
            max_secs,
        );
        let took = t0.elapsed();
        assert!(
            f.ok,
            "download of {len} bytes via {via:?} failed after {} bytes: {}",
            f.len, f.stderr
        );
        assert_eq!(f.len, len, "download via {via:?}: length");
        assert_eq!(
            f.sha256,
            pattern_sha256(seed, len),
            "download via {via:?}: sha256"
        );
        took
    }

    /// Uploads `len` bytes of content `seed` via `via` and asserts the server hashed exactly them.
    pub fn upload_checked(&self, via: Via, seed: u64, len: u64, max_secs: u64) -> Duration {
        let file = self.dir.path().join(format!("upload-{seed}.bin"));
        let want = write_pattern_file(&file, seed, len);
        let t0 = Instant::now();
        let out = upload(
            self.net.client(),
            via,
            &self.url("/upload"),
            &file,
            max_secs,
        );
        let took = t0.elapsed();
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success(),
            "upload via {via:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "upload via {via:?}: sha256 seen by the server"
        );
        took
    }
}

/// Prints a throughput line for `bytes` moved in `took`.
pub fn report(what: &str, bytes: u64, took: Duration) {
    eprintln!(
        "{what}: {} MiB in {:.2} s ({:.1} MB/s)",
        bytes >> 20,
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64()
    );
}

/// One request/response through a SOCKS5 UDP ASSOCIATE on `127.0.0.1:socks_port` in `ns` to `target`:
/// returns the reply payload. Bounded: retries the datagram for up to `within`.
pub fn socks5_udp_roundtrip(
    ns: &Netns,
    socks_port: u16,
    target: SocketAddr,
    payload: &[u8],
    within: Duration,
) -> Result<Vec<u8>, String> {
    let payload = payload.to_vec();
    in_ns(ns, move || {
        let SocketAddr::V4(t) = target else {
            return Err("IPv4 targets only".to_string());
        };
        let proxy = SocketAddr::from(([127, 0, 0, 1], socks_port));
        let mut ctl = TcpStream::connect_timeout(&proxy, Duration::from_secs(2))
            .map_err(|e| format!("connect {proxy}: {e}"))?;
        ctl.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        ctl.write_all(&[5, 1, 0]).map_err(|e| e.to_string())?;
        let mut m = [0u8; 2];
        ctl.read_exact(&mut m)
            .map_err(|e| format!("method reply: {e}"))?;
        if m != [5, 0] {
            return Err(format!("method reply {m:?}"));
        }
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let local = udp.local_addr().unwrap();
        let mut req = vec![5, 3, 0, 1, 127, 0, 0, 1];
        req.extend_from_slice(&local.port().to_be_bytes());
        ctl.write_all(&req).map_err(|e| e.to_string())?;
        let mut rep = [0u8; 10];
        ctl.read_exact(&mut rep)
            .map_err(|e| format!("UDP ASSOCIATE reply: {e}"))?;
        if rep[..2] != [5, 0] || rep[3] != 1 {
            return Err(format!("UDP ASSOCIATE reply {rep:?}"));
        }
        let relay = SocketAddr::from((
            [rep[4], rep[5], rep[6], rep[7]],
            u16::from_be_bytes([rep[8], rep[9]]),
        ));
        let mut dgram = vec![0, 0, 0, 1];
        dgram.extend_from_slice(&t.ip().octets());
        dgram.extend_from_slice(&t.port().to_be_bytes());
        let hdr = dgram.len();
        dgram.extend_from_slice(&payload);
        udp.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 65536];
        loop {
            udp.send_to(&dgram, relay)
                .map_err(|e| format!("send to relay {relay}: {e}"))?;
            match udp.recv_from(&mut buf) {
                Ok((n, from)) if from == relay && n >= hdr => {
                    if buf[..hdr] != dgram[..hdr] {
                        return Err(format!(
                            "reply header {:?}, want {:?}",
                            &buf[..hdr],
                            &dgram[..hdr]
                        ));
                    }
                    drop(ctl);
                    return Ok(buf[hdr..n].to_vec());
                }
                Ok((n, from)) => return Err(format!("unexpected {n}-byte datagram from {from}")),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("no reply through the relay {relay}: {e}"))
                }
                Err(_) => {}
            }
        }
    })
}

/// One request/response through a UDP forward at `127.0.0.1:port` in `ns`, retried for up to `within`.
pub fn udp_forward_roundtrip(
    ns: &Netns,
    port: u16,
    payload: &[u8],
    within: Duration,
) -> Result<Vec<u8>, String> {
    let payload = payload.to_vec();
    in_ns(ns, move || {
        let u = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 65536];
        loop {
            u.send_to(&payload, ("127.0.0.1", port))
                .map_err(|e| e.to_string())?;
            match u.recv_from(&mut buf) {
                Ok((n, _)) => return Ok(buf[..n].to_vec()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("no reply through the UDP forward: {e}"))
                }
                Err(_) => {}
            }
        }
    })
}

/// Lines of `text` that look like the daemon explaining a key mismatch.
pub fn key_complaints(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("key")
                && (l.contains("crypto") || l.contains("guard") || l.contains("decrypt"))
        })
        .map(str::to_owned)
        .collect()
}

/// Waits up to `within` for `pred` over the `/metrics` text of `ns`.
pub fn wait_metric(ns: &Netns, within: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
    poll(within, || match http_get(ns, METRICS_PORT, "/metrics") {
        Ok((200, t)) if pred(&t) => Some(t),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Packet captures
// ---------------------------------------------------------------------------------------------------------

/// A `tcpdump` writing what `filter` matches on `dev` in `ns` to a file; killed on drop.
pub struct Tcpdump {
    child: Child,
    file: PathBuf,
}

impl Tcpdump {
    /// Starts `tcpdump -i DEV -U -n [ARGS] -w FILE FILTER` and waits (bounded) until the capture is open.
    pub fn start(ns: &Netns, dev: &str, file: PathBuf, args: &[&str], filter: &str) -> Tcpdump {
        let child = ns
            .command("tcpdump")
            .args(["-i", dev, "-U", "-n"])
            .args(args)
            .arg("-w")
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tcpdump");
        // tcpdump creates its file once the capture is open.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(Instant::now() < deadline, "tcpdump on {dev} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Tcpdump { child, file }
    }

    /// Stops the capture (SIGINT) and returns it as `tcpdump -n -r` prints it, one packet a line.
    pub fn finish(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A capture of every packet sent from the tunnel port ([`TUNNEL_PORT`]) on `dev` in `ns`, RSTs included.
pub struct RstCapture(Tcpdump);

impl RstCapture {
    pub fn start(ns: &Netns, dev: &str, file: PathBuf) -> RstCapture {
        // Everything from the tunnel port; RSTs are picked out when reading (a `tcp[tcpflags]` capture filter
        // matched nothing even when RSTs were on the wire).
        RstCapture(Tcpdump::start(
            ns,
            dev,
            file,
            &[],
            &format!("tcp src port {TUNNEL_PORT}"),
        ))
    }

    /// Stops the capture; (packets from the tunnel port, of which RSTs).
    pub fn count(self) -> (usize, usize) {
        let text = self.0.finish();
        let from_port = format!(".{TUNNEL_PORT} > ");
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&from_port)).collect();
        let rsts = lines.iter().filter(|l| l.contains("Flags [R")).count();
        (lines.len(), rsts)
    }
}

// ---- SOCKS5 streams for the e2e tests that hold many of them (dropin, rotate, multiserver) ----

/// A SOCKS5 CONNECT (no auth) to the IPv4 `target` through `proxy`; reads time out after 30 s.
pub fn socks5_connect(proxy: SocketAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let mut c = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.set_nodelay(true)?;
    c.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    c.read_exact(&mut m)?;
    if m != [5, 0] {
        return Err(std::io::Error::other(format!("method reply {m:?}")));
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
        return Err(std::io::Error::other(format!("CONNECT reply {}", rep[1])));
    }
    Ok(c)
}

/// Sends `chunks` pattern chunks of `chunk` bytes through the echo stream `c`, `pace` apart, while reading
/// the echo back; returns the (sent, received) sha256.
pub fn paced_echo(
    c: TcpStream,
    seed: u64,
    chunk: usize,
    chunks: usize,
    pace: Duration,
) -> Result<(String, String), String> {
    let data = pattern_bytes(seed, chunk * chunks);
    let sent = hex::encode(Sha256::digest(&data));
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for part in data.chunks(chunk) {
            w.write_all(part)?;
            std::thread::sleep(pace);
        }
        Ok(())
    });
    let mut h = Sha256::new();
    let mut left = chunk * chunks;
    let mut buf = vec![0u8; 1 << 16];
    let mut r = &c;
    while left > 0 {
        let n = r
            .read(&mut buf[..left.min(1 << 16)])
            .map_err(|e| format!("read with {left} bytes left: {e}"))?;
        if n == 0 {
            return Err(format!("end of stream with {left} bytes left"));
        }
        h.update(&buf[..n]);
        left -= n;
    }
    writer
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| format!("write: {e}"))?;
    Ok((sent, hex::encode(h.finalize())))
}
