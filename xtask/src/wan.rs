//! `bench wan`: goodput over emulated WAN paths (bottleneck rate × RTT × random loss), paqet-dp with each of
//! its congestion controllers beside kcptun and plain TCP, measured side by side in one run.
//!
//! Three namespaces of our own (names carry the pid), addresses only on their two veth pairs:
//!
//! ```text
//!  ns c (client)                    ns m (router = the WAN)                             ns s (server)
//!  [pw<pid>c] 10.218.k.1 ──veth── 10.218.k.254 [pw<pid>mc]   [pw<pid>ms] 10.219.k.254 ──veth── 10.219.k.1 [pw<pid>s]
//!
//!  m, FORWARD:  1. count (in = ms: what the server side put on the path, before any loss)
//!               2. -i ms / -i mc: -m statistic --mode random --probability p -j DROP   (loss, each direction)
//!               3. -j NFQUEUE: paqet-impair holds every packet RTT/2 (delay, each direction; one relay
//!                  process per direction, queues 7 and 8)
//!  m, egress of mc and ms: tbf rate R, burst 1 ms of R (at least 4 frames), limit 50 ms × R (the buffer)
//! ```
//!
//! Per cell and row: the idle RTT of small requests, then one download (server → client) for `--secs` after a
//! warm-up while small requests measure the RTT under load, and `--parallel` downloads at once. Traffic never
//! leaves the namespaces.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys::{self, Daemon, Netns, NetnsExt, TempDir, VethPair};
use crate::tunnel::{self, Front, Proc};

/// The target in the server namespace: first byte `S` = endless source (`B`: with TCP congestion control bbr,
/// `C`: cubic), `E` = echo.
const MUX_PORT: u16 = 5301;
/// paqet-dp client's TCP forward to the target (used when SOCKS5 is not served).
const FWD_MUX: u16 = 18020;
/// NFQUEUE numbers of the download (in from ms) and upload (in from mc) directions: one relay process each,
/// so the kernel work each verdict triggers (forwarding, tbf, the receiving endpoint's TCP) spreads over two
/// threads.
const QUEUE_DOWN: u16 = 7;
const QUEUE_UP: u16 = 8;
/// How often each relay reports how late its verdicts were.
const RELAY_STATS: Duration = Duration::from_millis(500);
/// NFQUEUE length for the relay: packets held at once (500 Mbit/s × 100 ms one-way ≈ 4,500 data packets plus
/// their ACKs; the relay check without a bottleneck holds several times that).
const RELAY_QUEUE_LEN: u32 = 65536;
const MAC_C: &str = "02:00:00:be:1c:01";
const MAC_MC: &str = "02:00:00:be:1c:fe";
const MAC_MS: &str = "02:00:00:be:1d:fe";
const MAC_S: &str = "02:00:00:be:1d:01";
/// The bottleneck's queue, in milliseconds of its rate.
const BUFFER_MS: u64 = 50;
/// Windows of the `off` and kcptun rows (upstream-style fixed windows).
const FIXED_WND: u32 = 2048;
/// KCP payload per datagram at the default MTU 1350 (minus nonce+CRC 20 and the KCP header 24): for the
/// "windows cover the BDP" check.
const KCP_SEG_PAYLOAD: u64 = 1306;
const PROBE_LEN: usize = 64;
const IDLE_PROBES: usize = 10;
const PROBE_GAP: Duration = Duration::from_millis(20);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped download may take to deliver what its source had written.
const DRAIN_MAX: Duration = Duration::from_secs(30);
const TCP_MEM: &str = "4096 131072 67108864";

/// Options of `bench wan`.
pub struct Opts {
    pub bin: String,
    pub relay: String,
    /// Bottleneck rates, Mbit/s.
    pub rates: Vec<u32>,
    /// Path RTTs, ms (the relay delays each direction by half).
    pub rtts: Vec<u32>,
    /// Random loss per direction, %.
    pub losses: Vec<f64>,
    pub rows: Vec<Row>,
    pub secs: u64,
    /// Parallel downloads per cell (0 = skip).
    pub parallel: usize,
    pub mode: String,
    /// Force these windows on every KCP row.
    pub windows: Option<u32>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            bin: String::new(),
            relay: String::new(),
            rates: vec![20, 100, 500],
            rtts: vec![20, 100, 200],
            losses: vec![0.0, 1.0, 5.0],
            rows: ALL_ROWS.to_vec(),
            secs: 10,
            parallel: 8,
            mode: "xdp-native".into(),
            windows: None,
        }
    }
}

/// One row of the matrix: a tunnel configuration or plain TCP.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Row {
    Bbr,
    /// `bbr` on paqet-dp's authenticated wire (`block = "noise"`) instead of kcp-go's aes.
    BbrNoise,
    Fixed,
    Off,
    Kcptun,
    TcpBbr,
    TcpCubic,
}

pub const ALL_ROWS: [Row; 7] = [
    Row::Bbr,
    Row::BbrNoise,
    Row::Fixed,
    Row::Off,
    Row::Kcptun,
    Row::TcpBbr,
    Row::TcpCubic,
];

impl Row {
    pub fn name(self) -> &'static str {
        match self {
            Row::Bbr => "bbr",
            Row::BbrNoise => "bbr-noise",
            Row::Fixed => "fixed",
            Row::Off => "off",
            Row::Kcptun => "kcptun",
            Row::TcpBbr => "tcp-bbr",
            Row::TcpCubic => "tcp-cubic",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        ALL_ROWS
            .into_iter()
            .find(|r| r.name() == s)
            .with_context(|| {
                format!("--rows: unknown row {s:?} (bbr, bbr-noise, fixed, off, kcptun, tcp-bbr, tcp-cubic)")
            })
    }

    /// KCP windows of the row (`None` = the TOML default, auto-tuned); `None` for plain TCP.
    fn window(self, forced: Option<u32>) -> Option<u32> {
        match self {
            Row::TcpBbr | Row::TcpCubic => None,
            Row::Off | Row::Kcptun => Some(forced.unwrap_or(FIXED_WND)),
            Row::Bbr | Row::BbrNoise | Row::Fixed => forced,
        }
    }

    fn label(self, forced: Option<u32>) -> String {
        let wnd = match self.window(forced) {
            Some(w) => format!("{w} wnd"),
            None => "auto wnd".into(),
        };
        match self {
            Row::Bbr => format!("paqet-dp bbr, {wnd}"),
            Row::BbrNoise => format!("paqet-dp bbr, noise wire, {wnd}"),
            Row::Fixed => format!("paqet-dp fixed=R, {wnd}"),
            Row::Off => format!("paqet-dp off, {wnd}"),
            Row::Kcptun => format!("kcptun, {wnd}"),
            Row::TcpBbr => "TCP bbr".into(),
            Row::TcpCubic => "TCP cubic".into(),
        }
    }

    /// Header bytes per packet at the IP level in the download direction: IPv4 20 + TCP 32 (timestamps) for
    /// plain TCP and paqet-dp's TCP envelope, UDP 8 for kcptun; the tunnels add nonce+CRC 20 and a KCP
    /// segment header 24.
    fn header_bytes(self) -> u64 {
        match self {
            Row::TcpBbr | Row::TcpCubic => 20 + 32,
            Row::Bbr | Row::Fixed | Row::Off => 20 + 32 + 20 + 24,
            // The noise wire's header and tag: 29 bytes instead of kcp-go's nonce + CRC.
            Row::BbrNoise => 20 + 32 + 29 + 24,
            Row::Kcptun => 20 + 8 + 20 + 24,
        }
    }

    /// `[transport.kcp]` lines of a paqet-dp row (before `block`).
    fn kcp_lines(self, rate_mbit: u32, forced: Option<u32>) -> String {
        let mut s = String::from("mode = \"fast3\"\n");
        match self {
            Row::Fixed => s.push_str(&format!(
                "cc = \"fixed\"\nbandwidth = \"{rate_mbit}mbit\"\n"
            )),
            Row::Off => s.push_str("cc = \"off\"\n"),
            _ => s.push_str("cc = \"bbr\"\n"),
        }
        if let Some(w) = self.window(forced) {
            s.push_str(&format!("sndwnd = {w}\nrcvwnd = {w}\n"));
        }
        s
    }
}

/// One path of the matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cell {
    rate: u32,
    rtt: u32,
    loss: f64,
}

impl Cell {
    fn rate_bytes(&self) -> f64 {
        f64::from(self.rate) * 1e6 / 8.0
    }

    fn bdp_bytes(&self) -> f64 {
        self.rate_bytes() * f64::from(self.rtt) / 1e3
    }

    fn label(&self) -> String {
        format!(
            "{} Mbit/s, {} ms, {} %",
            self.rate,
            self.rtt,
            fmt_loss(self.loss)
        )
    }
}

fn fmt_loss(l: f64) -> String {
    if l.fract() == 0.0 {
        format!("{l:.0}")
    } else {
        format!("{l}")
    }
}

/// tbf parameters for `rate` Mbit/s: (burst bytes, limit bytes). The burst is 1 ms of the rate (at least four
/// full frames): with ¼ ms, plain TCP reached only ≈ 87 % of 500 Mbit/s here (tbf's timer fires late on a busy
/// machine and the tokens it could not hold are lost), with 1 ms ≈ 95 %, with 4 ms no more.
fn tbf_params(rate: u32) -> (u64, u64) {
    let per_ms = u64::from(rate) * 125; // bytes per millisecond
    (per_ms.max(4 * 1514), per_ms * BUFFER_MS)
}

/// One `stats` line of a relay: how late (after their due time) the verdicts of the last interval were.
struct LagSample {
    at: Instant,
    verdicts: u64,
    mean_us: u64,
    max_us: u64,
}

/// The relay processes (`paqet-impair` in ns m, one per direction), killed when dropped.
struct Relay {
    procs: Vec<Proc>,
    delay_ms: u32,
    lag: Arc<Mutex<Vec<LagSample>>>,
}

impl Relay {
    /// Verdict lateness over `[t0, t1]`: (mean ms weighted by verdicts, max ms), both directions.
    fn lag(&self, t0: Instant, t1: Instant) -> Option<(f64, f64)> {
        let v = self.lag.lock().ok()?;
        let (mut n, mut sum, mut max) = (0u64, 0f64, 0u64);
        for s in v.iter().filter(|s| s.at > t0 && s.at <= t1 + RELAY_STATS) {
            n += s.verdicts;
            sum += s.mean_us as f64 * s.verdicts as f64;
            max = max.max(s.max_us);
        }
        (n > 0).then(|| (sum / n as f64 / 1e3, max as f64 / 1e3))
    }
}

/// `stats held=H verdicts=N late_mean_us=M late_max_us=X` → a sample.
fn parse_lag(line: &str, at: Instant) -> Option<LagSample> {
    let rest = line.strip_prefix("stats ")?;
    let get = |k: &str| {
        rest.split_whitespace()
            .find_map(|f| f.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok())
    };
    Some(LagSample {
        at,
        verdicts: get("verdicts")?,
        mean_us: get("late_mean_us")?,
        max_us: get("late_max_us")?,
    })
}

/// The three namespaces and what ns m does to the packets. Field order = drop order: the relay first, then
/// the veths, then the namespaces.
struct Topo {
    relay: Option<Relay>,
    _cm: VethPair,
    _ms: VethPair,
    ns_c: Netns,
    ns_m: Netns,
    ns_s: Netns,
    c_if: String,
    mc_if: String,
    ms_if: String,
    s_if: String,
    ip_c: Ipv4Addr,
    ip_s: Ipv4Addr,
    relay_bin: String,
}

impl Topo {
    fn new(relay_bin: &str) -> Result<Self> {
        let pid = std::process::id();
        let k = (pid % 250 + 1) as u8;
        let (ip_c, ip_mc) = (Ipv4Addr::new(10, 218, k, 1), Ipv4Addr::new(10, 218, k, 254));
        let (ip_s, ip_ms) = (Ipv4Addr::new(10, 219, k, 1), Ipv4Addr::new(10, 219, k, 254));
        let ns_c = sys::netns("wc")?;
        let ns_m = sys::netns("wm")?;
        let ns_s = sys::netns("ws")?;
        let (c_if, mc_if, ms_if, s_if) = (
            format!("pw{pid}c"),
            format!("pw{pid}mc"),
            format!("pw{pid}ms"),
            format!("pw{pid}s"),
        );
        let cm = sys::veth(
            &c_if,
            &mc_if,
            &ns_c,
            &ns_m,
            MAC_C,
            MAC_MC,
            &format!("{ip_c}/24"),
            &format!("{ip_mc}/24"),
        )?;
        let ms = sys::veth(
            &ms_if,
            &s_if,
            &ns_m,
            &ns_s,
            MAC_MS,
            MAC_S,
            &format!("{ip_ms}/24"),
            &format!("{ip_s}/24"),
        )?;
        ns_c.exec(&[
            "ip",
            "route",
            "add",
            &format!("10.219.{k}.0/24"),
            "via",
            &ip_mc.to_string(),
        ])?;
        ns_s.exec(&[
            "ip",
            "route",
            "add",
            &format!("10.218.{k}.0/24"),
            "via",
            &ip_ms.to_string(),
        ])?;
        ns_m.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // Endpoints: TCP buffers that cover 500 Mbit/s × 200 ms plus the buffer, no cached path metrics between
        // connections (each run starts from scratch).
        for ns in [&ns_c, &ns_s] {
            ns.exec(&["sysctl", "-qw", &format!("net.ipv4.tcp_rmem={TCP_MEM}")])?;
            ns.exec(&["sysctl", "-qw", &format!("net.ipv4.tcp_wmem={TCP_MEM}")])?;
            ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_no_metrics_save=1"])?;
        }
        // MTU-sized packets on the path (no TSO/GSO super-packets for the loss rule and the relay to see as one),
        // no GRO merging in m.
        for (ns, dev) in [
            (&ns_c, &c_if),
            (&ns_m, &mc_if),
            (&ns_m, &ms_if),
            (&ns_s, &s_if),
        ] {
            ns.exec(&[
                "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off",
            ])?;
            let _ = ns.exec(&["ethtool", "-K", dev, "gro", "off"]);
        }
        // The pcap path's host rules and the raw PREROUTING DROP (`paqet-dp --manage-firewall`), as in `bench tunnel`.
        tunnel::host_rules(&ns_c, &ns_s, ip_s)?;
        tunnel::stack_drop(&ns_c, &ns_s, ip_s, true)?;
        ns_s.run(start_target)?;
        Ok(Self {
            relay: None,
            _cm: cm,
            _ms: ms,
            ns_c,
            ns_m,
            ns_s,
            c_if,
            mc_if,
            ms_if,
            s_if,
            ip_c,
            ip_s,
            relay_bin: relay_bin.into(),
        })
    }

    /// Shapes the path: bottleneck `rate` Mbit/s (`None` = no tbf), `delay_ms` each way, `loss` % each way.
    fn set(&mut self, rate: Option<u32>, delay_ms: u32, loss: f64) -> Result<()> {
        for dev in [self.mc_if.clone(), self.ms_if.clone()] {
            match rate {
                Some(r) => {
                    let (burst, limit) = tbf_params(r);
                    self.ns_m.exec(&[
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        &dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{r}mbit"),
                        "burst",
                        &burst.to_string(),
                        "limit",
                        &limit.to_string(),
                    ])?;
                }
                None => {
                    let _ = self.ns_m.exec(&["tc", "qdisc", "del", "dev", &dev, "root"]);
                }
            }
        }
        self.ns_m.exec(&["iptables", "-w", "-F", "FORWARD"])?;
        if self.relay.as_ref().map(|r| r.delay_ms) != Some(delay_ms).filter(|d| *d > 0) {
            self.relay = None;
            if delay_ms > 0 {
                self.relay = Some(self.start_relay(delay_ms)?);
            }
        }
        let ms = self.ms_if.clone();
        let mc = self.mc_if.clone();
        // Rule 1 counts what the server side put on the path (before the loss rules).
        self.ns_m
            .exec(&["iptables", "-w", "-A", "FORWARD", "-i", &ms])?;
        if loss > 0.0 {
            let p = format!("{:.6}", loss / 100.0);
            for dev in [&ms, &mc] {
                self.ns_m.exec(&[
                    "iptables",
                    "-w",
                    "-A",
                    "FORWARD",
                    "-i",
                    dev,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ])?;
            }
        }
        if self.relay.is_some() {
            for (dev, q) in [(&ms, QUEUE_DOWN), (&mc, QUEUE_UP)] {
                self.ns_m.exec(&[
                    "iptables",
                    "-w",
                    "-A",
                    "FORWARD",
                    "-i",
                    dev,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &q.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// Starts one relay per direction; each reports its verdicts' lateness every `RELAY_STATS`.
    fn start_relay(&self, delay_ms: u32) -> Result<Relay> {
        let lag = Arc::new(Mutex::new(Vec::new()));
        let mut procs = Vec::new();
        for q in [QUEUE_DOWN, QUEUE_UP] {
            let mut child = self
                .ns_m
                .command(&self.relay_bin)
                .args([
                    "--queue",
                    &q.to_string(),
                    "--delay-ms",
                    &delay_ms.to_string(),
                    "--max-len",
                    &RELAY_QUEUE_LEN.to_string(),
                    "--stats-ms",
                    &RELAY_STATS.as_millis().to_string(),
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("starting the relay {}", self.relay_bin))?;
            let out = child.stdout.take().context("relay stdout")?;
            procs.push(Proc(child));
            let (tx, rx) = mpsc::channel();
            let lag = lag.clone();
            // Reads until the relay exits (EOF), so its stdout never fills.
            std::thread::spawn(move || {
                use std::io::BufRead;
                let mut lines = std::io::BufReader::new(out).lines().map_while(Result::ok);
                let _ = tx.send(lines.next().unwrap_or_default());
                for l in lines {
                    if let (Some(s), Ok(mut v)) = (parse_lag(&l, Instant::now()), lag.lock()) {
                        v.push(s);
                    }
                }
            });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(l) if l.trim() == "ready" => {}
                Ok(l) => bail!(
                    "the relay for queue {q} did not start (first line {:?}; see its stderr above)",
                    l.trim()
                ),
                Err(_) => bail!("the relay for queue {q} did not report ready within 10 s"),
            }
        }
        Ok(Relay {
            procs,
            delay_ms,
            lag,
        })
    }

    /// CPU seconds of the relay processes so far.
    fn relay_cpu(&self) -> f64 {
        self.relay
            .iter()
            .flat_map(|r| &r.procs)
            .filter_map(|p| sys::proc_cpu(p.0.id()).ok())
            .sum()
    }

    /// The relays' verdict lateness over `[t0, t1]` (mean, max ms).
    fn relay_lag(&self, t0: Instant, t1: Instant) -> Option<(f64, f64)> {
        self.relay.as_ref()?.lag(t0, t1)
    }

    /// (packets, bytes) the server side put on the path so far (FORWARD rule 1 in m).
    fn down_counter(&self) -> Result<(u64, u64)> {
        let out = self.ns_m.exec(&[
            "iptables",
            "-w",
            "-L",
            "FORWARD",
            "-v",
            "-x",
            "-n",
            "--line-numbers",
        ])?;
        parse_rule1(&out).with_context(|| format!("no rule 1 in m's FORWARD chain:\n{out}"))
    }

    /// Packets the bottleneck queue dropped so far in the download direction (tbf on mc).
    fn tbf_drops(&self) -> u64 {
        self.ns_m
            .exec(&["tc", "-s", "qdisc", "show", "dev", &self.mc_if])
            .ok()
            .and_then(|o| parse_tbf_dropped(&o))
            .unwrap_or(0)
    }

    /// Packets the relays' queues dropped (queue full or relay too slow), since they started.
    fn relay_drops(&self) -> u64 {
        self.ns_m
            .exec(&["cat", "/proc/net/netfilter/nfnetlink_queue"])
            .ok()
            .map(|o| parse_nfqueue_drops(&o))
            .unwrap_or(0)
    }

    /// Waits (≤ `max`) until the download direction is quiet: less than 16 KB counted in 200 ms.
    fn wait_quiet(&self, max: Duration) {
        let end = Instant::now() + max;
        let mut last = self.down_counter().map(|c| c.1).unwrap_or(0);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.down_counter().map(|c| c.1).unwrap_or(0);
            if now.saturating_sub(last) < 16 << 10 {
                return;
            }
            last = now;
        }
    }
}

/// (pkts, bytes) of rule 1 in `iptables -L CHAIN -v -x -n --line-numbers` output.
fn parse_rule1(out: &str) -> Option<(u64, u64)> {
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&"1"))
            .then(|| Some((f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?)))
            .flatten()
    })
}

/// The `dropped N` figure of `tc -s qdisc show` output (first qdisc).
fn parse_tbf_dropped(out: &str) -> Option<u64> {
    let i = out.find("dropped ")?;
    out[i + 8..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// queue_dropped + user_dropped summed over `/proc/net/netfilter/nfnetlink_queue` lines.
fn parse_nfqueue_drops(out: &str) -> u64 {
    out.lines()
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            f.get(5).copied().unwrap_or(0) + f.get(6).copied().unwrap_or(0)
        })
        .sum()
}

/// Binds the target on 0.0.0.0:MUX_PORT of the current namespace: per connection, the first byte picks an
/// endless source (`S`) or an echo (`E`).
fn start_target() -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", MUX_PORT))
        .with_context(|| format!("binding the target port {MUX_PORT}"))?;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || serve(c));
        }
    });
    Ok(())
}

/// Set to end every download: each source stops writing and shuts its sending side down, so the reader gets
/// EOF once everything written so far has been delivered (the bytes-per-byte ratio then covers a whole transfer).
static STOP_SOURCES: AtomicBool = AtomicBool::new(false);

fn serve(mut c: TcpStream) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(300)));
    let _ = c.set_write_timeout(Some(Duration::from_secs(30)));
    let mut cmd = [0u8; 1];
    if c.read_exact(&mut cmd).is_err() {
        return;
    }
    let cc = match cmd[0] {
        b'B' => Some("bbr"),
        b'C' => Some("cubic"),
        _ => None,
    };
    if let Some(cc) = cc {
        // Per socket: a namespace may only pick a default from tcp_allowed_congestion_control, root may pick any here.
        if let Err(e) = set_congestion(&c, cc) {
            eprintln!("bench wan: target: setsockopt(TCP_CONGESTION, {cc}): {e}");
            return;
        }
    }
    match cmd[0] {
        b'S' | b'B' | b'C' => {
            let buf = vec![0x5au8; 64 << 10];
            while !STOP_SOURCES.load(Ordering::Relaxed) {
                if c.write_all(&buf).is_err() {
                    return;
                }
            }
            let _ = c.shutdown(std::net::Shutdown::Write);
            // Hold the socket until the reader closes (a close with unread data would reset the connection).
            let mut sink = [0u8; 64];
            let _ = c.read(&mut sink);
        }
        b'E' => {
            let _ = c.set_nodelay(true);
            tunnel::echo_conn(c);
        }
        _ => {}
    }
}

fn set_congestion(c: &TcpStream, cc: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid socket descriptor; the name buffer outlives the call and its length is passed.
    let r = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a connection to the target through `via` (call inside the client namespace) and sends `cmd`.
fn open_via(via: Front, ip_s: Ipv4Addr, cmd: u8) -> Result<TcpStream> {
    let local = |port: u16| -> Result<TcpStream> {
        let a = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let s = TcpStream::connect_timeout(&a, IO_TIMEOUT)
            .with_context(|| format!("connecting to {a}"))?;
        s.set_nodelay(true)?;
        Ok(s)
    };
    let mut s = match via {
        Front::Direct | Front::Socks5 => tunnel::open(via, ip_s, MUX_PORT)?,
        Front::Forward => local(FWD_MUX)?,
        Front::Kcptun => local(tunnel::KCPTUN_LOCAL)?,
    };
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(&[cmd])?;
    Ok(s)
}

/// One small request and its echo on `s`; the round trip in ms.
fn probe(s: &mut TcpStream) -> Result<f64> {
    let req = [0x42u8; PROBE_LEN];
    let t0 = Instant::now();
    s.write_all(&req)?;
    let mut got = [0u8; PROBE_LEN];
    s.read_exact(&mut got).context("reading the echo")?;
    let dt = t0.elapsed().as_secs_f64() * 1e3;
    if got != req {
        bail!("the echo differs from the request");
    }
    Ok(dt)
}

/// A thread reading a download into a byte counter until `stop` (read timeouts let it look at `stop`) or
/// EOF after `STOP_SOURCES`.
struct Reader {
    bytes: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<Result<()>>,
}

fn spawn_reader(mut s: TcpStream, stop: Arc<AtomicBool>) -> Result<Reader> {
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let bytes = Arc::new(AtomicU64::new(0));
    let b = bytes.clone();
    let handle = std::thread::spawn(move || -> Result<()> {
        let mut buf = vec![0u8; 256 << 10];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) if STOP_SOURCES.load(Ordering::Relaxed) => return Ok(()),
                Ok(0) => bail!(
                    "the download ended after {} bytes",
                    b.load(Ordering::Relaxed)
                ),
                Ok(n) => {
                    b.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => bail!("reading the download: {e}"),
            }
        }
        Ok(())
    });
    Ok(Reader { bytes, handle })
}

/// Sets its flag when dropped: readers stop even when a measurement returns early with an error.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn join_reader(r: Reader) -> Result<()> {
    r.handle
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
}

/// Figures of one (cell, row).
#[derive(Default)]
struct Measured {
    front: String,
    goodput_mbit: f64,
    idle_ms: f64,
    /// Loaded RTT samples minus the idle p50, ms, sorted.
    added_ms: Vec<f64>,
    probe_failures: usize,
    /// Download-direction IP bytes and packets on the path, and bytes the application received: over the whole
    /// transfer when `drained`, else over the measured window only.
    wire_bytes: u64,
    wire_pkts: u64,
    delivered: u64,
    drained: bool,
    tbf_drops: u64,
    relay_drops: u64,
    /// Relay verdict lateness during the single download (mean, max ms).
    relay_lag: Option<(f64, f64)>,
    par: Option<Par>,
}

struct Par {
    goodput_mbit: f64,
    jain: f64,
    min_share: f64,
    max_share: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Jain's fairness index of `x`: (Σx)² / (n·Σx²), 1 = equal shares, 1/n = one takes all.
fn jain(x: &[f64]) -> f64 {
    let (s, s2) = x.iter().fold((0.0, 0.0), |(s, s2), v| (s + v, s2 + v * v));
    if s2 == 0.0 {
        return f64::NAN;
    }
    s * s / (x.len() as f64 * s2)
}

/// The warm-up before a measurement: 2 s, or 10 RTTs on long paths.
fn warmup(cell: Cell) -> Duration {
    Duration::from_millis(u64::from(cell.rtt) * 10).max(Duration::from_secs(2))
}

/// Idle RTT, one download with RTT probes beside it, then `parallel` downloads; the path must be shaped and
/// the row's tunnel (if any) up.
/// `src` is the target's command byte of the downloads (`S`, or `B`/`C` to pick plain TCP's algorithm).
fn measure(
    path: &Topo,
    via: Front,
    src: u8,
    cell: Cell,
    secs: u64,
    parallel: usize,
) -> Result<Measured> {
    let ip_s = path.ip_s;
    let mut m = Measured {
        front: via.name().into(),
        ..Default::default()
    };
    let relay_drops0 = path.relay_drops();
    let mut ps = path.ns_c.run(move || open_via(via, ip_s, b'E'))?;
    let mut idle = Vec::with_capacity(IDLE_PROBES);
    for _ in 0..IDLE_PROBES {
        idle.push(probe(&mut ps)?);
        std::thread::sleep(PROBE_GAP);
    }
    idle.sort_by(f64::total_cmp);
    m.idle_ms = percentile(&idle, 0.5);

    // One download, probes beside it after the warm-up. The bytes-per-byte ratio covers the whole transfer: from
    // before the connection opens until the source has stopped and everything it wrote arrived (EOF).
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    STOP_SOURCES.store(false, Ordering::Relaxed);
    let c_start = path.down_counter()?;
    let bulk = path.ns_c.run(move || open_via(via, ip_s, src))?;
    let reader = spawn_reader(bulk, stop.clone())?;
    std::thread::sleep(warmup(cell));
    let (c0, d0, b0, t0) = (
        path.down_counter()?,
        path.tbf_drops(),
        reader.bytes.load(Ordering::Relaxed),
        Instant::now(),
    );
    let end = t0 + Duration::from_secs(secs);
    let prober = std::thread::spawn(move || {
        let (mut v, mut failures) = (Vec::new(), 0usize);
        while Instant::now() < end {
            match probe(&mut ps) {
                Ok(d) => v.push(d),
                Err(_) => {
                    // A timed-out echo leaves the stream out of step: stop probing rather than pair the wrong replies.
                    failures += 1;
                    break;
                }
            }
            std::thread::sleep(PROBE_GAP);
        }
        (v, failures)
    });
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let (b1, t1, c1, d1) = (
        reader.bytes.load(Ordering::Relaxed),
        Instant::now(),
        path.down_counter()?,
        path.tbf_drops(),
    );
    STOP_SOURCES.store(true, Ordering::Relaxed);
    let drain_end = Instant::now() + DRAIN_MAX;
    while !reader.handle.is_finished() && Instant::now() < drain_end {
        std::thread::sleep(Duration::from_millis(20));
    }
    m.drained = reader.handle.is_finished();
    stop.store(true, Ordering::Relaxed);
    let total = reader.bytes.clone();
    let r = join_reader(reader);
    let (loaded, failures) = prober
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?;
    r?;
    let goodput_bytes = b1 - b0;
    m.goodput_mbit = goodput_bytes as f64 * 8.0 / (t1 - t0).as_secs_f64() / 1e6;
    if m.drained {
        path.wait_quiet(Duration::from_secs(5));
        let c_end = path.down_counter()?;
        // The echoes of the probes during the download crossed the path too: delivered to the application as well.
        m.delivered = total.load(Ordering::Relaxed) + (loaded.len() * PROBE_LEN) as u64;
        m.wire_pkts = c_end.0 - c_start.0;
        m.wire_bytes = c_end.1 - c_start.1;
    } else {
        m.delivered = goodput_bytes;
        m.wire_pkts = c1.0 - c0.0;
        m.wire_bytes = c1.1 - c0.1;
    }
    m.tbf_drops = d1.saturating_sub(d0);
    m.relay_lag = path.relay_lag(t0, t1);
    m.added_ms = loaded.iter().map(|v| v - m.idle_ms).collect();
    m.added_ms.sort_by(f64::total_cmp);
    m.probe_failures = failures;

    if parallel > 0 {
        path.wait_quiet(Duration::from_secs(10));
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_guard = StopOnDrop(stop.clone());
        STOP_SOURCES.store(false, Ordering::Relaxed);
        let streams = path.ns_c.run(move || {
            (0..parallel)
                .map(|_| open_via(via, ip_s, src))
                .collect::<Result<Vec<_>>>()
        })?;
        let readers = streams
            .into_iter()
            .map(|s| spawn_reader(s, stop.clone()))
            .collect::<Result<Vec<_>>>()?;
        std::thread::sleep(warmup(cell));
        let snap = |rs: &[Reader]| {
            rs.iter()
                .map(|r| r.bytes.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        };
        let (s0, t0) = (snap(&readers), Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let (s1, t1) = (snap(&readers), Instant::now());
        STOP_SOURCES.store(true, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let mut err = None;
        for r in readers {
            if let Err(e) = join_reader(r) {
                err.get_or_insert(e);
            }
        }
        if let Some(e) = err {
            return Err(e.context("parallel downloads"));
        }
        let per: Vec<f64> = s0.iter().zip(&s1).map(|(a, b)| (b - a) as f64).collect();
        let total: f64 = per.iter().sum();
        let share = |f: fn(f64, f64) -> f64, init: f64| {
            per.iter().fold(init, |a, &v| f(a, v)) / total * 100.0
        };
        m.par = Some(Par {
            goodput_mbit: total * 8.0 / (t1 - t0).as_secs_f64() / 1e6,
            jain: jain(&per),
            min_share: share(f64::min, f64::INFINITY),
            max_share: share(f64::max, 0.0),
        });
    }
    m.relay_drops = path.relay_drops().saturating_sub(relay_drops0);
    Ok(m)
}

/// The processes of a row's tunnel, stopped when dropped.
enum Ends {
    None,
    Kcptun(#[allow(dead_code)] (Proc, Proc)),
    Paqet(Box<(Daemon, Daemon)>),
}

/// The cores of (server, client) daemons: first and last CPU of this process's mask, as `bench tunnel` does.
fn daemon_cpus() -> Option<(usize, usize)> {
    let cpus = sys::allowed_cpus();
    match (cpus.first(), cpus.last()) {
        (Some(&a), Some(&b)) if a != b => Some((a, b)),
        _ => None,
    }
}

/// Waits (≤ `secs`) until an echo makes it through `via`; `alive` is checked between attempts.
fn wait_through(
    path: &Topo,
    via: Front,
    secs: u64,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let ip_s = path.ip_s;
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        alive()?;
        let r = path.ns_c.run(move || {
            let mut s = open_via(via, ip_s, b'E')?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            probe(&mut s)
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("no echo through {} within {secs} s: {e:#}", via.name())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Starts the row's tunnel (or sets the server's TCP congestion control); returns how to reach the target.
fn start_row(
    path: &Topo,
    opts: &Opts,
    dir: &TempDir,
    cell: Cell,
    row: Row,
) -> Result<(Ends, Front)> {
    match row {
        // The sender's algorithm is set per socket by the source (command byte `B` or `C`, see `run_row`).
        Row::TcpBbr | Row::TcpCubic => Ok((Ends::None, Front::Direct)),
        Row::Kcptun => {
            let wnd = row.window(opts.windows).unwrap_or(FIXED_WND);
            let target = format!("127.0.0.1:{MUX_PORT}");
            let ends = tunnel::start_kcptun(
                &path.ns_c,
                &path.ns_s,
                path.ip_s,
                daemon_cpus(),
                &target,
                wnd,
            )?;
            wait_through(path, Front::Kcptun, 20, || Ok(()))?;
            Ok((Ends::Kcptun(ends), Front::Kcptun))
        }
        Row::Bbr | Row::BbrNoise | Row::Fixed | Row::Off => {
            let kcp = row.kcp_lines(cell.rate, opts.windows);
            let cpus = daemon_cpus();
            let noise = row == Row::BbrNoise;
            let server_cfg = tunnel::server_toml(&path.s_if, path.ip_s, MAC_MS, &kcp, false);
            let server_cfg = tunnel::noise_wire(server_cfg, noise, true);
            let client_cfg =
                tunnel::client_toml(&path.c_if, path.ip_c, path.ip_s, MAC_MC, &kcp, false);
            let mut client_cfg = tunnel::noise_wire(client_cfg, noise, false);
            client_cfg.push_str(&format!("[[forward]]\nlisten = \"127.0.0.1:{FWD_MUX}\"\ntarget = \"127.0.0.1:{MUX_PORT}\"\nprotocol = \"tcp\"\n"));
            let tag = row.name();
            let mut server = Daemon::spawn(
                &path.ns_s,
                &opts.bin,
                &dir.0,
                &format!("server-{tag}"),
                &server_cfg,
                &opts.mode,
                cpus.map(|c| c.0),
            )?;
            let mut client = Daemon::spawn(
                &path.ns_c,
                &opts.bin,
                &dir.0,
                &format!("client-{tag}"),
                &client_cfg,
                &opts.mode,
                cpus.map(|c| c.1),
            )?;
            let up = wait_through(path, Front::Forward, 30, || {
                server.check_alive()?;
                client.check_alive()
            });
            if let Err(e) = up {
                bail!(
                    "{e:#}\n--- client log ---\n{}\n--- server log ---\n{}",
                    client.log_tail(10),
                    server.log_tail(10)
                );
            }
            let ip_s = path.ip_s;
            let front = if path
                .ns_c
                .run(move || open_via(Front::Socks5, ip_s, b'E').and_then(|mut s| probe(&mut s)))
                .is_ok()
            {
                Front::Socks5
            } else {
                Front::Forward
            };
            Ok((Ends::Paqet(Box::new((server, client))), front))
        }
    }
}

fn run_row(path: &Topo, opts: &Opts, dir: &TempDir, cell: Cell, row: Row) -> Result<Measured> {
    let (mut ends, via) = start_row(path, opts, dir, cell, row)?;
    let src = match row {
        Row::TcpBbr => b'B',
        Row::TcpCubic => b'C',
        _ => b'S',
    };
    let m = measure(path, via, src, cell, opts.secs, opts.parallel);
    if let Ends::Paqet(d) = &mut ends {
        let (server, client) = &mut **d;
        if let Err(e) = server.check_alive().and_then(|_| client.check_alive()) {
            return Err(e.context("a daemon died during the measurement"));
        }
    }
    drop(ends);
    path.wait_quiet(Duration::from_secs(10));
    m
}

/// The relay's ceiling here: plain TCP (bbr, `n` streams) through it with `delay_ms` each way and no bottleneck.
struct RelayCheck {
    delay_ms: u32,
    n: usize,
    mbit: f64,
    relay_cpu_pct: f64,
    relay_drops: u64,
    relay_lag: Option<(f64, f64)>,
}

fn relay_check(path: &mut Topo, delay_ms: u32, n: usize, secs: u64) -> Result<RelayCheck> {
    path.set(None, delay_ms, 0.0)?;
    let ip_s = path.ip_s;
    let d0 = path.relay_drops();
    let r = (|| -> Result<RelayCheck> {
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_guard = StopOnDrop(stop.clone());
        STOP_SOURCES.store(false, Ordering::Relaxed);
        let streams = path.ns_c.run(move || {
            (0..n)
                .map(|_| open_via(Front::Direct, ip_s, b'B'))
                .collect::<Result<Vec<_>>>()
        })?;
        let readers = streams
            .into_iter()
            .map(|s| spawn_reader(s, stop.clone()))
            .collect::<Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_secs(3));
        let total = |rs: &[Reader]| {
            rs.iter()
                .map(|r| r.bytes.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let cpu = || path.relay_cpu();
        let (b0, c0, t0) = (total(&readers), cpu(), Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let (b1, c1, t1) = (total(&readers), cpu(), Instant::now());
        STOP_SOURCES.store(true, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            join_reader(r)?;
        }
        let dt = (t1 - t0).as_secs_f64();
        Ok(RelayCheck {
            delay_ms,
            n,
            mbit: (b1 - b0) as f64 * 8.0 / dt / 1e6,
            relay_cpu_pct: (c1 - c0) / dt * 100.0,
            relay_drops: path.relay_drops().saturating_sub(d0),
            relay_lag: path.relay_lag(t0, t1),
        })
    })();
    path.wait_quiet(Duration::from_secs(10));
    r
}

/// Runs the matrix; returns the markdown report (`None` when not root: skipped with a message).
pub fn run(opts: &Opts) -> Result<Option<String>> {
    if !sys::is_root() {
        eprintln!(
            "bench wan: skipped: it needs root (network namespaces, veth, tbf, iptables, NFQUEUE, XDP); run \
             `sudo -E cargo xtask bench wan`"
        );
        return Ok(None);
    }
    let started = Instant::now();
    let dir = TempDir::new("wan")?;
    let mut path = Topo::new(&opts.relay)?;
    let mut notes: Vec<String> = Vec::new();
    let kcptun_ok = tunnel::kcptun_installed();
    if opts.rows.contains(&Row::Kcptun) && !kcptun_ok {
        notes.push(
            "kcptun is not installed (`apt-get install kcptun`): its row is not measured".into(),
        );
    }

    let max_delay = opts.rtts.iter().copied().max().unwrap_or(0) / 2;
    eprintln!("bench wan: relay check (plain TCP bbr × 8 through the relay, {max_delay} ms each way, no bottleneck)");
    let check = relay_check(&mut path, max_delay.max(1), 8, opts.secs);

    let mut cells = Vec::new();
    for &rate in &opts.rates {
        for &rtt in &opts.rtts {
            for &loss in &opts.losses {
                cells.push(Cell { rate, rtt, loss });
            }
        }
    }
    let mut results: Vec<(Cell, Row, Result<Measured>)> = Vec::new();
    let mut cell_secs = Vec::new();
    for (i, &cell) in cells.iter().enumerate() {
        let t = Instant::now();
        eprintln!(
            "bench wan: cell {}/{}: {}",
            i + 1,
            cells.len(),
            cell.label()
        );
        if let Err(e) = path.set(Some(cell.rate), cell.rtt / 2, cell.loss) {
            notes.push(format!("{}: cannot shape the path: {e:#}", cell.label()));
            continue;
        }
        for &row in &opts.rows {
            if row == Row::Kcptun && !kcptun_ok {
                continue;
            }
            eprintln!("bench wan:   {}", row.label(opts.windows));
            let r = run_row(&path, opts, &dir, cell, row);
            if let Err(e) = &r {
                eprintln!("bench wan:   {} failed: {e:#}", row.name());
            }
            results.push((cell, row, r));
        }
        cell_secs.push(t.elapsed().as_secs_f64());
    }
    let total = started.elapsed().as_secs_f64();
    drop(path);
    Ok(Some(render(
        opts, &check, &results, &mut notes, &cell_secs, total,
    )))
}

fn pct_of_rtt(ms: f64, rtt: u32) -> f64 {
    ms / f64::from(rtt) * 100.0
}

fn render(
    opts: &Opts,
    check: &Result<RelayCheck>,
    results: &[(Cell, Row, Result<Measured>)],
    notes: &mut Vec<String>,
    cell_secs: &[f64],
    total_secs: f64,
) -> String {
    let mut md = String::from("## WAN matrix (`cargo xtask bench wan`)\n\n");
    md.push_str(&format!(
        "Client — router — server namespaces; in the router: random loss per direction (iptables statistic), RTT/2 \
         delay per direction (paqet-impair, NFQUEUE), and a tbf bottleneck on both egress interfaces with a {BUFFER_MS} ms \
         buffer. Data path `{}`; paqet-dp and kcptun: KCP fast3, cipher aes, guard off; windows: {}. One download for \
         {} s after a warm-up of max(2 s, 10 RTT), then {} parallel downloads for as long. Endpoint TCP buffers up \
         to 64 MiB.\n\n",
        opts.mode,
        match opts.windows {
            Some(w) => format!("{w} packets on every KCP row (`--windows`)"),
            None => format!("bbr and fixed rows the TOML default (auto), off and kcptun {FIXED_WND} packets"),
        },
        opts.secs,
        opts.parallel,
    ));
    match check {
        Ok(c) => {
            md.push_str(&format!(
                "Relay ceiling: plain TCP (bbr, {} streams) through paqet-impair (one process per direction) with {} ms each \
                 way and no bottleneck moved **{:.0} Mbit/s** (relay processes' CPU {:.0} % of one core, {} packets dropped \
                 by their queues, verdicts late by {}).",
                c.n,
                c.delay_ms,
                c.mbit,
                c.relay_cpu_pct,
                c.relay_drops,
                fmt_lag(c.relay_lag)
            ));
            if let Some(&max) = opts.rates.iter().max() {
                if c.mbit < f64::from(max) * 1.05 {
                    md.push_str(&format!(
                        " Below the largest bottleneck rate ({max} Mbit/s): cells at that rate are limited by the relay, \
                         not by tbf."
                    ));
                }
            }
            md.push_str("\n\n");
        }
        Err(e) => md.push_str(&format!("Relay check failed: {e:#}\n\n")),
    }
    let mut fronts: Vec<String> = Vec::new();
    for (_, row, r) in results {
        if let Ok(m) = r {
            let f = format!("{}: {}", row.name(), m.front);
            if !fronts.contains(&f) {
                fronts.push(f);
            }
        }
    }
    if !fronts.is_empty() {
        md.push_str(&format!(
            "Client side of each row: {}.\n\n",
            fronts.join("; ")
        ));
    }
    md.push_str(&format!(
        "| rate Mbit/s | RTT ms | loss % | row | goodput % of rate | idle RTT ms | added delay p50 ms (% RTT) | added p99 ms (% RTT), samples | wire bytes / delivered | excl. headers | bottleneck drops | relay lag mean / max ms | {n}× goodput % | {n}× Jain | {n}× min–max share % |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        n = opts.parallel
    ));
    for (cell, row, r) in results {
        let head = format!(
            "| {} | {} | {} | {} |",
            cell.rate,
            cell.rtt,
            fmt_loss(cell.loss),
            row.label(opts.windows)
        );
        match r {
            Ok(m) => {
                let added = |p: f64| {
                    let v = percentile(&m.added_ms, p);
                    if v.is_nan() {
                        "n/a".to_string()
                    } else {
                        format!("{v:.1} ({:.0} %)", pct_of_rtt(v, cell.rtt))
                    }
                };
                let (wire, net) = overhead(m, *row);
                // `~`: the download did not end within DRAIN_MAX after its source stopped; measured window only.
                let approx = if m.drained { "" } else { "~" };
                let par = match &m.par {
                    Some(p) => format!(
                        " {:.1} | {:.3} | {:.1}–{:.1} |",
                        p.goodput_mbit / f64::from(cell.rate) * 100.0,
                        p.jain,
                        p.min_share,
                        p.max_share
                    ),
                    None => " - | - | - |".into(),
                };
                md.push_str(&format!(
                    "{head} {:.1} | {:.1} | {} | {} n={} | {approx}{} | {approx}{} | {} | {} |{par}\n",
                    m.goodput_mbit / f64::from(cell.rate) * 100.0,
                    m.idle_ms,
                    added(0.5),
                    added(0.99),
                    m.added_ms.len(),
                    fmt_ratio(wire),
                    fmt_ratio(net),
                    m.tbf_drops,
                    m.relay_lag
                        .map_or("n/a".into(), |(a, b)| format!("{a:.1} / {b:.1}")),
                ));
                if m.probe_failures > 0 {
                    notes.push(format!(
                        "{} / {}: an echo under load timed out ({} s): probing stopped after {} samples",
                        cell.label(),
                        row.name(),
                        IO_TIMEOUT.as_secs(),
                        m.added_ms.len()
                    ));
                }
                if let Some((lag, _)) = m
                    .relay_lag
                    .filter(|(lag, _)| *lag > (0.05 * f64::from(cell.rtt)).max(2.0))
                {
                    notes.push(format!(
                        "{} / {}: the relays were {lag:.1} ms late on average (more than max(2 ms, 5 % of the RTT)): \
                         their own queueing is part of the added delay",
                        cell.label(),
                        row.name()
                    ));
                }
                if !m.drained {
                    notes.push(format!(
                        "{} / {}: the download did not end within {} s after its source stopped: bytes per byte delivered \
                         (marked ~) cover the measured window only",
                        cell.label(),
                        row.name(),
                        DRAIN_MAX.as_secs()
                    ));
                }
                if m.relay_drops > 0 {
                    notes.push(format!(
                        "{} / {}: the relays' queues dropped {} packets during this row's measurements (extra loss)",
                        cell.label(),
                        row.name(),
                        m.relay_drops
                    ));
                }
            }
            Err(e) => {
                md.push_str(&format!("{head} failed | | | | | | | | | | |\n"));
                notes.push(format!("{} / {}: {e:#}", cell.label(), row.name()));
            }
        }
    }
    md.push_str(
        "\nGoodput: bytes the client application received per second over the measured window, as % of the bottleneck \
         rate. Added delay: RTT of 64-byte echoes (a separate connection through the same tunnel; for plain TCP a separate \
         TCP connection) during the download minus the idle RTT measured just before, p50/p99, and as % of the path RTT. \
         Wire bytes: IP bytes the server side put on the path in the download direction (counted in the router before the \
         loss rule) per byte the client application received, over the whole single download (from before it connects \
         until its source has stopped and the client read everything written, EOF; the probes' echoes count as \
         delivered); `excl. headers` subtracts each packet's headers (plain TCP 52 bytes, paqet-dp 96 = \
         IP + TCP + nonce/CRC + KCP, kcptun 72 = IP + UDP + nonce/CRC + KCP), leaving retransmissions and control traffic. \
         Bottleneck drops: packets the tbf queue dropped in the download direction during the download. Relay lag: how \
         long after their due time the relays issued the verdicts of that window (their own queueing, part of the added \
         delay; it should stay far below the RTT). Parallel: \
         aggregate goodput, Jain's fairness index ((Σx)²/(n·Σx²), 1 = equal) and the smallest and largest stream's share of \
         the aggregate (equal = 100/n %).\n",
    );

    md.push_str("\n### Targets (ratios from this run)\n\n");
    md.push_str(&targets(opts, results));

    if !cell_secs.is_empty() {
        let avg = cell_secs.iter().sum::<f64>() / cell_secs.len() as f64;
        md.push_str(&format!(
            "\nRun time {:.1} min for {} cells × {} rows ({avg:.0} s per cell on average, relay check included in the total).\n",
            total_secs / 60.0,
            cell_secs.len(),
            opts.rows.len()
        ));
    }
    if !notes.is_empty() {
        md.push_str("\n### Problems\n\n");
        for n in notes.iter() {
            md.push_str(&format!("- {}\n", n.replace('\n', "\n  ")));
        }
    }
    md
}

/// (wire bytes / delivered, same with each packet's headers removed).
fn overhead(m: &Measured, row: Row) -> (f64, f64) {
    if m.delivered == 0 {
        return (f64::NAN, f64::NAN);
    }
    let d = m.delivered as f64;
    let net = m
        .wire_bytes
        .saturating_sub(m.wire_pkts * row.header_bytes()) as f64;
    (m.wire_bytes as f64 / d, net / d)
}

fn fmt_lag(l: Option<(f64, f64)>) -> String {
    l.map_or("n/a".into(), |(mean, max)| {
        format!("{mean:.1} ms on average, {max:.1} ms at most")
    })
}

fn fmt_ratio(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else {
        format!("{v:.3}")
    }
}

/// A cell's figure against a target: (cell, figure, margin: how far on the good side of the threshold).
type Check = (String, f64, f64);

/// One line per target: how many cells met it, which did not, or the closest call.
fn targets(opts: &Opts, results: &[(Cell, Row, Result<Measured>)]) -> String {
    let get = |cell: &Cell, row: Row| {
        results
            .iter()
            .find(|(c, r, _)| c == cell && *r == row)
            .and_then(|(_, _, m)| m.as_ref().ok())
    };
    let bbr: Vec<(&Cell, &Measured)> = results
        .iter()
        .filter(|(_, r, _)| *r == Row::Bbr)
        .filter_map(|(c, _, m)| m.as_ref().ok().map(|m| (c, m)))
        .collect();
    if bbr.is_empty() {
        return "No bbr row measured: no target applies.\n".into();
    }
    let mut md = String::new();
    let mut line = |what: &str, items: Vec<Check>, fmt: &dyn Fn(f64) -> String| {
        if items.is_empty() {
            md.push_str(&format!("- {what}: no cell of this run applies\n"));
            return;
        }
        let failed: Vec<String> = items
            .iter()
            .filter(|i| i.2 < 0.0)
            .map(|i| format!("{} ({})", i.0, fmt(i.1)))
            .collect();
        let met = items.len() - failed.len();
        let tail = if failed.is_empty() {
            let closest = items
                .iter()
                .min_by(|a, b| a.2.total_cmp(&b.2))
                .expect("non-empty");
            format!("; closest: {} ({})", closest.0, fmt(closest.1))
        } else {
            format!("; not met at {}", failed.join(", "))
        };
        md.push_str(&format!(
            "- {what}: {} in {met}/{} cells{tail}\n",
            if failed.is_empty() { "met" } else { "NOT met" },
            items.len()
        ));
    };
    // Windows cover the BDP: auto windows always (they grow), fixed ones when wnd × segment ≥ rate × RTT.
    let covers = |c: &Cell| {
        opts.windows
            .is_none_or(|w| (u64::from(w) * KCP_SEG_PAYLOAD) as f64 >= c.bdp_bytes())
    };
    let pct = |c: &Cell, m: &Measured| m.goodput_mbit / f64::from(c.rate) * 100.0;
    let goodput = |lo: f64, hi: f64, min: f64| -> Vec<Check> {
        bbr.iter()
            .filter(|(c, _)| c.loss >= lo && c.loss <= hi && c.rtt <= 200 && covers(c))
            .map(|(c, m)| (c.label(), pct(c, m), pct(c, m) - min))
            .collect()
    };
    let in_pct = |v: f64| format!("{v:.1} %");
    line(
        "bbr ≥ 85 % of the bottleneck at ≤ 1 % loss (RTT ≤ 200 ms, windows covering the BDP)",
        goodput(0.0, 1.0, 85.0),
        &in_pct,
    );
    line(
        "bbr ≥ 75 % of the bottleneck at 5 % loss (RTT ≤ 200 ms, windows covering the BDP)",
        goodput(1.0 + 1e-9, 5.0, 75.0),
        &in_pct,
    );
    let vs_kcptun: Vec<Check> = bbr
        .iter()
        .filter(|(c, _)| c.loss > 0.0 || c.rtt >= 100)
        .filter_map(|(c, m)| {
            let ratio = m.goodput_mbit / get(c, Row::Kcptun)?.goodput_mbit.max(1e-9);
            Some((c.label(), ratio, ratio - 2.0))
        })
        .collect();
    line(
        "bbr ≥ 2× kcptun's goodput where loss > 0 or RTT ≥ 100 ms",
        vs_kcptun,
        &|v| format!("{v:.2}×"),
    );
    let delay: Vec<Check> = bbr
        .iter()
        .filter(|(_, m)| !m.added_ms.is_empty())
        .map(|(c, m)| {
            let p = pct_of_rtt(percentile(&m.added_ms, 0.5), c.rtt);
            (c.label(), p, 25.0 - p)
        })
        .collect();
    line(
        "bbr added queueing delay p50 ≤ 25 % of the path RTT",
        delay,
        &|v| format!("{v:.0} % of RTT"),
    );
    let sent: Vec<Check> = bbr
        .iter()
        .filter(|(_, m)| m.delivered > 0)
        .map(|(c, m)| {
            let net = overhead(m, Row::Bbr).1;
            (c.label(), net, 1.0 + 2.0 * c.loss / 100.0 - net)
        })
        .collect();
    line(
        "bbr bytes sent per byte delivered (headers excluded) ≤ 1 + 2 × loss rate",
        sent,
        &|v| format!("{v:.3}"),
    );
    md
}

/// The relay binary: `--relay`, `$PAQET_IMPAIR_BIN`, or `paqet-impair` beside `bin`.
pub fn relay_beside(bin: &str) -> Option<String> {
    if let Some(p) = std::env::var_os("PAQET_IMPAIR_BIN") {
        return Some(p.to_string_lossy().into_owned());
    }
    let cand = std::path::Path::new(bin).parent()?.join("paqet-impair");
    cand.is_file().then(|| cand.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        let ipt = "Chain FORWARD (policy ACCEPT 0 packets, 0 bytes)\nnum      pkts      bytes target     prot opt in     out     source               destination\n1        12     17000            all  --  pw1ms  *       0.0.0.0/0            0.0.0.0/0\n2         3      4500 DROP       all  --  pw1ms  *       0.0.0.0/0            0.0.0.0/0  statistic mode random probability 0.01000000009\n";
        assert_eq!(parse_rule1(ipt), Some((12, 17000)));
        let tc = "qdisc tbf 8001: root refcnt 2 rate 100Mbit burst 6056b lat 49.9ms\n Sent 123 bytes 4 pkt (dropped 17, overlimits 9 requeues 0)\n";
        assert_eq!(parse_tbf_dropped(tc), Some(17));
        assert_eq!(
            parse_nfqueue_drops("    7  12345     0 1     0  5  6  999 1\n"),
            11
        );
        let s = parse_lag(
            "stats held=10 verdicts=400 late_mean_us=120 late_max_us=900",
            Instant::now(),
        )
        .unwrap();
        assert_eq!((s.verdicts, s.mean_us, s.max_us), (400, 120, 900));
        assert!(parse_lag("ready", Instant::now()).is_none());
    }

    #[test]
    fn jain_and_percentile() {
        assert!((jain(&[1.0, 1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
    }

    #[test]
    fn rows_and_tbf() {
        assert_eq!(
            Row::Off.kcp_lines(100, None),
            "mode = \"fast3\"\ncc = \"off\"\nsndwnd = 2048\nrcvwnd = 2048\n"
        );
        assert_eq!(
            Row::Bbr.kcp_lines(100, None),
            "mode = \"fast3\"\ncc = \"bbr\"\n"
        );
        assert!(Row::Fixed
            .kcp_lines(20, Some(512))
            .contains("bandwidth = \"20mbit\"\nsndwnd = 512\n"));
        assert_eq!(Row::parse("tcp-cubic").unwrap(), Row::TcpCubic);
        assert!(Row::parse("reno").is_err());
        assert_eq!(tbf_params(20), (6056, 125_000));
        assert_eq!(tbf_params(100), (12_500, 625_000));
        assert_eq!(tbf_params(500), (62_500, 3_125_000));
    }
}
