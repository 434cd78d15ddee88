//! `bench soak`: a paqet-dp server and client under continuous, varied load for N minutes, sampled every
//! minute, with a verdict on growth and on what is left behind once the load stops. What it catches is what
//! upstream users report after hours (memory growth, dead connections): leaks of memory, descriptors,
//! sessions, streams and timers.
//!
//! Topology: `paqet-testkit`'s impaired link (three namespaces of our own named `pqb<pid>sk{A,M,B}`, client in
//! A, server in B, M routing between them), the bench's host rules (`tunnel::host_rules`, `tunnel::stack_drop`)
//! and its daemon configurations (`tunnel::client_toml`, `tunnel::server_toml`), daemons started with
//! [`Daemon::spawn`]. Targets in B: TCP echo, an endless TCP source and two UDP echoes.
//!
//! Load (threads of this process inside A, all through the client's SOCKS5):
//! - short streams: 3 threads opening a stream, echoing 64 B–8 KiB and closing it, back to back;
//! - long streams: 6 threads each holding an echo stream for 20–95 s (a 256-byte round trip every 250 ms);
//! - one throttled download (≈ 1 MB/s from the source, 45 s per stream, then a new one);
//! - UDP ASSOCIATE: one thread with short associations (two flows, 10 datagrams each, then closed) and one
//!   that leaves its flows idle for 70 s (the 60 s idle timer closes them) before closing;
//! - session churn, every minute but the restart's: a second client process (pcap, own SOCKS5 and metrics
//!   ports) starts, carries 20 requests and is stopped (its session on the server must go away);
//! - one lossy minute (relay: 2 % loss, 5 ± 5 ms delay each way, so reordering too);
//! - one server restart (the client must carry requests again within 60 s).
//!
//! Samples: a baseline before the load, one per minute, one right after the load stops and one after the
//! settle period. Each: VmRSS and open descriptors of both daemons (`/proc/PID`), their `paqet_sessions`,
//! `paqet_streams`, the client's `paqet_socks5_udp_channels` (the front end's idle timers; a session's timers
//! are its own deadline, counted by `paqet_sessions`), their error counters and the load's successes and
//! failures of the minute. The verdict ([`verdict`]) is computed from these samples only.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use paqet_testkit::impair::{ImpairedLink, LinkSpec};

use crate::sys::{self, Daemon, Netns, TempDir};
use crate::tunnel::{self, ECHO_PORT, METRICS_PORT, SOCKS_PORT, SOURCE_PORT};

/// UDP echo targets in the server namespace (two, so an association carries two flows).
const UDP_ECHO_PORT: u16 = 5204;
/// The churn client's SOCKS5 and metrics ports (the main client uses `SOCKS_PORT` and `METRICS_PORT`).
const CHURN_SOCKS: u16 = 11081;
const CHURN_METRICS: u16 = 19091;
/// The lossy minute's link.
const LOSSY: LinkSpec = LinkSpec {
    delay_ms: 5,
    jitter_ms: 5,
    loss_pct: 2.0,
    dup_pct: 0.0,
    seed: 11,
};
const CLEAN: LinkSpec = LinkSpec {
    delay_ms: 0,
    jitter_ms: 0,
    loss_pct: 0.0,
    dup_pct: 0.0,
    seed: 11,
};
/// How long the client may take to carry requests again after the server restarted.
const RECOVERY_MAX: Duration = Duration::from_secs(60);

/// Growth verdict: a daemon fails when, over its samples after warm-up, the least-squares slope of the last
/// half exceeds the slope threshold AND the value grew by more than the growth threshold from the first
/// sample after warm-up to the last loaded one (a pool that fills once grows but then stays flat; a leak
/// keeps growing).
pub const RSS_SLOPE_KIB_PER_MIN: f64 = 512.0;
pub const RSS_GROWTH_KIB: f64 = 8192.0;
pub const FD_SLOPE_PER_MIN: f64 = 1.0;
pub const FD_GROWTH: f64 = 16.0;
/// Descriptors a daemon may hold above its baseline once the load stopped and the settle period passed.
pub const FD_SLACK: u64 = 4;
/// Failed operations allowed in minutes without loss or restart (share of all operations).
pub const QUIET_FAIL_SHARE: f64 = 0.05;
/// Samples after warm-up a growth judgement needs.
const MIN_GROWTH_SAMPLES: usize = 3;

/// Options of `bench soak`.
pub struct Opts {
    pub bin: String,
    pub minutes: u64,
    /// Data path of both main daemons (`pcap`, `xdp-generic`, `xdp-native`); the churn client always runs pcap.
    pub mode: String,
    /// Wait after the load stops before the final sample.
    pub settle_secs: u64,
    /// `transport.kcp.window_mem` of both daemons (`None`: the default, 32 MiB).
    pub window_mem: Option<u64>,
}

/// The soak's default `transport.kcp.window_mem`: auto-tuned windows may then legitimately hold at most about
/// 2 MiB of a slow reader's data per direction, below the growth threshold (with the default 32 MiB, a session's
/// receive window fills behind the throttled download and the client's RSS floor rises by up to ~32 MiB over the
/// session's life; see docs/benchmarks.md, "Soak").
pub const DEFAULT_WINDOW_MEM: u64 = 2 << 20;

// ------------------------------------------------------------------------------------------------------------
// Samples and the verdict (pure; unit-tested)
// ------------------------------------------------------------------------------------------------------------

/// One daemon at one sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcSample {
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    /// The lowest VmRSS and descriptor count read (every 2 s) since the previous sample: the floor a leak
    /// raises, free of the moment's in-flight load. The growth verdict uses these.
    pub rss_min_kib: u64,
    pub fds_min: u64,
    /// From `/metrics` (`None`: not served at that moment).
    pub sessions: Option<f64>,
    pub streams: Option<f64>,
    pub udp_channels: Option<f64>,
    /// Cumulative crypto failures + session errors + TX failures.
    pub errors: Option<f64>,
}

/// Load operations of one interval: (ok, failed).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ops {
    pub short: (u64, u64),
    pub long: (u64, u64),
    pub udp: (u64, u64),
    pub churn: (u64, u64),
    pub bulk_mb: f64,
}

impl Ops {
    fn failed(&self) -> u64 {
        self.short.1 + self.long.1 + self.udp.1 + self.churn.1
    }
    fn total(&self) -> u64 {
        self.failed() + self.short.0 + self.long.0 + self.udp.0 + self.churn.0
    }
}

/// One row of the table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Minutes since the load started (negative or 0: baseline).
    pub t_min: f64,
    pub label: String,
    /// Taken while the load ran.
    pub loaded: bool,
    /// The minute had loss or a restart (failures expected).
    pub disturbed: bool,
    pub client: Option<ProcSample>,
    pub server: Option<ProcSample>,
    pub ops: Ops,
}

/// Least-squares slope of `y` over `x`; `None` for fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Growth of one series of one process after warm-up.
#[derive(Clone, Debug, PartialEq)]
pub struct Growth {
    pub samples: usize,
    pub first: f64,
    pub last: f64,
    /// Per minute, over the last half of the samples after warm-up.
    pub slope: f64,
}

/// The growth of `points` (minutes, value) of one process that started at `start_min`, ignoring the samples
/// before `start_min + warmup_min`; `None` when fewer than [`MIN_GROWTH_SAMPLES`] remain.
pub fn growth(points: &[(f64, f64)], start_min: f64, warmup_min: f64) -> Option<Growth> {
    let after: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(t, _)| *t >= start_min + warmup_min - 1e-9)
        .collect();
    if after.len() < MIN_GROWTH_SAMPLES {
        return None;
    }
    // The last half, at least two points.
    let half = &after[(after.len() / 2).min(after.len() - 2)..];
    Some(Growth {
        samples: after.len(),
        first: after[0].1,
        last: after[after.len() - 1].1,
        slope: slope(half)?,
    })
}

/// One line of the verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// What the run observed beside the samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Events {
    /// When the server restarted (minutes) and how long the client took to carry requests again (`None`:
    /// not within [`RECOVERY_MAX`]).
    pub restart: Option<(f64, Option<f64>)>,
    /// A request through the client after the settle period worked.
    pub final_request_ok: bool,
}

/// One process's samples of one figure: (pid, minute of its first sample, (minute, value) points).
type Series = (u32, f64, Vec<(f64, f64)>);

/// Splits one daemon's loaded samples into per-process series: (pid, first sample's minute, points).
fn series(
    samples: &[Sample],
    pick: impl Fn(&Sample) -> Option<&ProcSample>,
    value: impl Fn(&ProcSample) -> f64,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for s in samples.iter().filter(|s| s.loaded || s.t_min <= 0.0) {
        let Some(p) = pick(s) else { continue };
        match out.last_mut() {
            Some((pid, _, pts)) if *pid == p.pid => pts.push((s.t_min, value(p))),
            _ => out.push((p.pid, s.t_min, vec![(s.t_min, value(p))])),
        }
    }
    out
}

/// The verdict on `samples` (baseline first, final sample after the settle period last): growth after
/// `warmup_min` per daemon process, nothing left behind, recovery after the restart, the tunnel still working,
/// and failures in quiet minutes. `restart_min` starts the restarted server's series (its warm-up counts from
/// there).
pub fn verdict(samples: &[Sample], warmup_min: f64, events: &Events) -> Vec<Check> {
    let mut checks = Vec::new();
    let restart_min = events.restart.map(|r| r.0);
    for (who, pick) in [
        (
            "client",
            (|s: &Sample| s.client.as_ref()) as fn(&Sample) -> Option<&ProcSample>,
        ),
        ("server", |s: &Sample| s.server.as_ref()),
    ] {
        for (what, unit, slope_max, growth_max, value) in [
            (
                "VmRSS",
                " KiB",
                RSS_SLOPE_KIB_PER_MIN,
                RSS_GROWTH_KIB,
                (|p: &ProcSample| p.rss_min_kib as f64) as fn(&ProcSample) -> f64,
            ),
            ("open fds", "", FD_SLOPE_PER_MIN, FD_GROWTH, |p| {
                p.fds_min as f64
            }),
        ] {
            for (pid, first_t, pts) in series(samples, pick, value) {
                // The restarted server's warm-up counts from the restart.
                let start = match restart_min {
                    Some(r) if first_t > 0.0 && who == "server" => r.max(0.0),
                    _ => 0.0,
                };
                let name = format!("{who} {what} growth (pid {pid})");
                match growth(&pts, start, warmup_min) {
                    None => checks.push(Check {
                        name,
                        pass: true,
                        detail: format!(
                            "not judged: fewer than {MIN_GROWTH_SAMPLES} samples after {warmup_min} min of warm-up"
                        ),
                    }),
                    Some(g) => {
                        let grew = g.last - g.first;
                        let fail = g.slope > slope_max && grew > growth_max;
                        checks.push(Check {
                            name,
                            pass: !fail,
                            detail: format!(
                                "{:.0} → {:.0}{unit} over {} samples after warm-up ({grew:+.0}), slope of the last half {:+.1}{unit}/min \
                                 (fails when slope > {slope_max} and growth > {growth_max})",
                                g.first, g.last, g.samples, g.slope
                            ),
                        });
                    }
                }
            }
        }
    }

    // Nothing left behind: the final sample against the baseline.
    let (Some(base), Some(fin)) = (samples.first(), samples.last()) else {
        checks.push(Check {
            name: "nothing left behind".into(),
            pass: false,
            detail: "no samples".into(),
        });
        return checks;
    };
    for (who, b, f) in [
        ("client", base.client.as_ref(), fin.client.as_ref()),
        ("server", base.server.as_ref(), fin.server.as_ref()),
    ] {
        let (Some(b), Some(f)) = (b, f) else {
            checks.push(Check {
                name: format!("{who}: nothing left behind"),
                pass: false,
                detail: "the daemon was not running at the baseline or at the end".into(),
            });
            continue;
        };
        let mut bad = Vec::new();
        let fmt = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0}"));
        let cmp =
            |name: &str, bv: Option<f64>, fv: Option<f64>, bad: &mut Vec<String>| match (bv, fv) {
                (Some(bv), Some(fv)) if fv <= bv => {}
                _ => bad.push(format!("{name} {} → {}", fmt(bv), fmt(fv))),
            };
        cmp("sessions", b.sessions, f.sessions, &mut bad);
        cmp("streams", b.streams, f.streams, &mut bad);
        if who == "client" {
            cmp("UDP channels", b.udp_channels, f.udp_channels, &mut bad);
        }
        if f.fds > b.fds + FD_SLACK {
            bad.push(format!("fds {} → {} (slack {FD_SLACK})", b.fds, f.fds));
        }
        checks.push(Check {
            name: format!("{who}: nothing left behind"),
            pass: bad.is_empty(),
            detail: if bad.is_empty() {
                format!(
                    "sessions {}, streams {}, fds {} (baseline {}), after the settle period",
                    fmt(f.sessions),
                    fmt(f.streams),
                    f.fds,
                    b.fds
                )
            } else {
                bad.join("; ")
            },
        });
    }

    if let Some((at, rec)) = events.restart {
        checks.push(Check {
            name: "client recovers after the server restart".into(),
            pass: rec.is_some(),
            detail: match rec {
                Some(s) => {
                    format!("requests carried again {s:.1} s after the restart at minute {at:.1}")
                }
                None => format!(
                    "no request through the client within {} s after the restart",
                    RECOVERY_MAX.as_secs()
                ),
            },
        });
    }
    checks.push(Check {
        name: "tunnel works at the end".into(),
        pass: events.final_request_ok,
        detail: if events.final_request_ok {
            "a new SOCKS5 request after the settle period got its echo".into()
        } else {
            "a new SOCKS5 request after the settle period failed (dead tunnel)".into()
        },
    });
    let quiet: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.loaded && !s.disturbed)
        .collect();
    let (failed, total) = quiet
        .iter()
        .fold((0, 0), |(f, t), s| (f + s.ops.failed(), t + s.ops.total()));
    let share = if total > 0 {
        failed as f64 / total as f64
    } else {
        0.0
    };
    checks.push(Check {
        name: "failures in quiet minutes".into(),
        pass: total > 0 && share <= QUIET_FAIL_SHARE,
        detail: format!(
            "{failed} of {total} operations failed ({:.2} %; limit {:.0} %) in {} minutes without loss or restart",
            share * 100.0,
            QUIET_FAIL_SHARE * 100.0,
            quiet.len()
        ),
    });
    checks
}

/// The markdown table of `samples`.
pub fn table(samples: &[Sample]) -> String {
    let mut md = String::from(
        "| min | phase | client RSS MiB (minute's floor) | client fds (floor) | client sessions | client streams | client UDP channels | server pid | server RSS MiB (floor) | server fds (floor) | server sessions | server streams | short streams ok/failed | long streams ok/failed | UDP datagrams ok/failed | churn ok/failed | download MB | daemon errors client/server |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0}"));
    let pair = |p: (u64, u64)| format!("{}/{}", p.0, p.1);
    for s in samples {
        let c = s.client.clone().unwrap_or_default();
        let (sp, sr, sf, ss, st, se) = match &s.server {
            Some(p) => (
                p.pid.to_string(),
                format!(
                    "{:.1} ({:.1})",
                    p.rss_kib as f64 / 1024.0,
                    p.rss_min_kib as f64 / 1024.0
                ),
                format!("{} ({})", p.fds, p.fds_min),
                f(p.sessions),
                f(p.streams),
                f(p.errors),
            ),
            None => (
                "down".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
        };
        md.push_str(&format!(
            "| {:.1} | {} | {:.1} ({:.1}) | {} ({}) | {} | {} | {} | {sp} | {sr} | {sf} | {ss} | {st} | {} | {} | {} | {} | {:.0} | {} / {se} |\n",
            s.t_min,
            s.label,
            c.rss_kib as f64 / 1024.0,
            c.rss_min_kib as f64 / 1024.0,
            c.fds,
            c.fds_min,
            f(c.sessions),
            f(c.streams),
            f(c.udp_channels),
            pair(s.ops.short),
            pair(s.ops.long),
            pair(s.ops.udp),
            pair(s.ops.churn),
            s.ops.bulk_mb,
            f(c.errors),
        ));
    }
    md
}

// ------------------------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------------------------

/// Cumulative load counters (the sampler takes differences).
#[derive(Default)]
struct Counters {
    short_ok: AtomicU64,
    short_fail: AtomicU64,
    long_ok: AtomicU64,
    long_fail: AtomicU64,
    udp_ok: AtomicU64,
    udp_fail: AtomicU64,
    churn_ok: AtomicU64,
    churn_fail: AtomicU64,
    bulk_bytes: AtomicU64,
}

impl Counters {
    fn ops(&self) -> Ops {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ops {
            short: (g(&self.short_ok), g(&self.short_fail)),
            long: (g(&self.long_ok), g(&self.long_fail)),
            udp: (g(&self.udp_ok), g(&self.udp_fail)),
            churn: (g(&self.churn_ok), g(&self.churn_fail)),
            bulk_mb: g(&self.bulk_bytes) as f64 / 1e6,
        }
    }
}

fn ops_delta(a: &Ops, b: &Ops) -> Ops {
    let d = |x: (u64, u64), y: (u64, u64)| (y.0 - x.0, y.1 - x.1);
    Ops {
        short: d(a.short, b.short),
        long: d(a.long, b.long),
        udp: d(a.udp, b.udp),
        churn: d(a.churn, b.churn),
        bulk_mb: b.bulk_mb - a.bulk_mb,
    }
}

fn bump(ok: bool, a: &AtomicU64, b: &AtomicU64) {
    if ok { a } else { b }.fetch_add(1, Ordering::Relaxed);
}

/// Sleeps `d` in short steps; false when `stop` was set meanwhile.
fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(100)));
    }
    !stop.load(Ordering::Relaxed)
}

/// One echo of `n` bytes on `s`.
fn echo_once(s: &mut TcpStream, n: usize, fill: u8) -> Result<()> {
    let req = vec![fill; n];
    s.write_all(&req)?;
    let mut got = vec![0u8; n];
    s.read_exact(&mut got).context("reading the echo")?;
    if got != req {
        bail!("the echo differs");
    }
    Ok(())
}

/// A new stream through SOCKS5 port `socks`, one echo, closed.
fn short_request(socks: u16, n: usize, fill: u8) -> Result<()> {
    let mut s = tunnel::socks5_connect(socks, ECHO_PORT)?;
    echo_once(&mut s, n, fill)
}

/// Targets in the current namespace: TCP echo, the endless source and two UDP echoes.
fn start_targets() -> Result<()> {
    let echo = TcpListener::bind(("127.0.0.1", ECHO_PORT)).context("binding the echo target")?;
    let src = TcpListener::bind(("127.0.0.1", SOURCE_PORT)).context("binding the source target")?;
    std::thread::spawn(move || {
        for c in echo.incoming().flatten() {
            std::thread::spawn(move || tunnel::echo_conn(c));
        }
    });
    std::thread::spawn(move || {
        for c in src.incoming().flatten() {
            std::thread::spawn(move || {
                let buf = vec![0x5au8; 64 << 10];
                let mut c = c;
                while c.write_all(&buf).is_ok() {}
            });
        }
    });
    for port in [UDP_ECHO_PORT, UDP_ECHO_PORT + 1] {
        let u = UdpSocket::bind(("127.0.0.1", port))
            .with_context(|| format!("binding the UDP echo target {port}"))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
    }
    Ok(())
}

/// A SOCKS5 UDP association: the control connection (kept open while it lasts) and the relay address.
fn udp_associate(socks: u16) -> Result<(TcpStream, SocketAddr)> {
    let a = SocketAddr::from((Ipv4Addr::LOCALHOST, socks));
    let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(10))?;
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    c.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    c.read_exact(&mut m)?;
    if m != [5, 0] {
        bail!("SOCKS5 method reply {m:?}");
    }
    // Unspecified address and port 0: the proxy learns our UDP port from the first datagram.
    c.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])?;
    let mut h = [0u8; 10];
    c.read_exact(&mut h)?;
    if h[1] != 0 || h[3] != 1 {
        bail!("SOCKS5 UDP ASSOCIATE reply {h:?}");
    }
    let ip = Ipv4Addr::new(h[4], h[5], h[6], h[7]);
    let port = u16::from_be_bytes([h[8], h[9]]);
    Ok((c, SocketAddr::from((ip, port))))
}

/// Sends `n` datagrams to each UDP echo target through the association at `relay` and counts their echoes.
fn udp_round(u: &UdpSocket, relay: SocketAddr, n: usize, k: &Counters, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    for i in 0..n {
        for port in [UDP_ECHO_PORT, UDP_ECHO_PORT + 1] {
            let p = port.to_be_bytes();
            let mut d = vec![0, 0, 0, 1, 127, 0, 0, 1, p[0], p[1]];
            d.extend_from_slice(format!("soak {port} {i}").as_bytes());
            let ok = u.send_to(&d, relay).is_ok()
                && loop {
                    // Skip late echoes of earlier datagrams.
                    match u.recv_from(&mut buf) {
                        Ok((m, _)) if m == d.len() && buf[..m] == d[..] => break true,
                        Ok(_) => continue,
                        Err(_) => break false,
                    }
                };
            bump(ok, &k.udp_ok, &k.udp_fail);
        }
        if !nap(stop, Duration::from_millis(100)) {
            return;
        }
    }
}

/// UDP ASSOCIATE load: `idle` = leave the flows idle past the 60 s idle timer before closing.
fn udp_worker(idle: bool, k: Arc<Counters>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let r = (|| -> Result<()> {
            let (_ctrl, relay) = udp_associate(SOCKS_PORT)?;
            let u = UdpSocket::bind(("127.0.0.1", 0))?;
            u.set_read_timeout(Some(Duration::from_secs(2)))?;
            udp_round(&u, relay, 10, &k, &stop);
            if idle && nap(&stop, Duration::from_secs(70)) {
                udp_round(&u, relay, 5, &k, &stop);
            }
            Ok(())
        })();
        if r.is_err() {
            k.udp_fail.fetch_add(1, Ordering::Relaxed);
            nap(&stop, Duration::from_secs(1));
        }
        nap(&stop, Duration::from_millis(200));
    }
}

/// Starts the load threads inside `ns`; they run until `stop`.
fn start_load(
    ns: &Netns,
    k: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<std::io::Result<()>>> {
    let mut hs = Vec::new();
    for t in 0..3u8 {
        let (k, stop) = (k.clone(), stop.clone());
        hs.push(ns.spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let n = 64 + (i * 997 + usize::from(t) * 331) % 8128;
                let ok = short_request(SOCKS_PORT, n, t).is_ok();
                bump(ok, &k.short_ok, &k.short_fail);
                nap(&stop, Duration::from_millis(if ok { 10 } else { 500 }));
            }
        }));
    }
    for t in 0..6u64 {
        let (k, stop) = (k.clone(), stop.clone());
        hs.push(ns.spawn(move || {
            let hold = Duration::from_secs(20 + t * 15);
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> Result<()> {
                    let mut s = tunnel::socks5_connect(SOCKS_PORT, ECHO_PORT)?;
                    let end = Instant::now() + hold;
                    while Instant::now() < end && nap(&stop, Duration::from_millis(250)) {
                        echo_once(&mut s, 256, 0x60 + t as u8)?;
                    }
                    Ok(())
                })();
                bump(r.is_ok(), &k.long_ok, &k.long_fail);
                if r.is_err() {
                    nap(&stop, Duration::from_secs(1));
                }
            }
        }));
    }
    {
        let (k, stop) = (k.clone(), stop.clone());
        hs.push(ns.spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> Result<()> {
                    let mut s = tunnel::socks5_connect(SOCKS_PORT, SOURCE_PORT)?;
                    let t0 = Instant::now();
                    let mut got = 0u64;
                    while t0.elapsed() < Duration::from_secs(45) && !stop.load(Ordering::Relaxed) {
                        let n = s.read(&mut buf)?;
                        if n == 0 {
                            bail!("the source ended");
                        }
                        got += n as u64;
                        k.bulk_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        // ≈ 1 MB/s.
                        let due = Duration::from_secs_f64(got as f64 / 1e6);
                        if let Some(w) = due.checked_sub(t0.elapsed()) {
                            std::thread::sleep(w);
                        }
                    }
                    Ok(())
                })();
                bump(r.is_ok(), &k.long_ok, &k.long_fail);
                if r.is_err() {
                    nap(&stop, Duration::from_secs(1));
                }
            }
        }));
    }
    for idle in [false, true] {
        let (k, stop) = (k.clone(), stop.clone());
        hs.push(ns.spawn(move || udp_worker(idle, k, stop)));
    }
    hs
}

/// VmRSS (KiB) and open descriptors of `pid`.
fn read_proc(pid: u32) -> Option<(u64, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((sys::rss_kib(pid).ok()?, fds))
}

/// Reads VmRSS and descriptors of the daemons every 2 s and keeps each pid's floor since it was last taken.
struct Poller {
    pids: Arc<std::sync::Mutex<Vec<u32>>>,
    floors: Arc<std::sync::Mutex<std::collections::HashMap<u32, (u64, u64)>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start() -> Self {
        let pids: Arc<std::sync::Mutex<Vec<u32>>> = Arc::default();
        let floors: Arc<std::sync::Mutex<std::collections::HashMap<u32, (u64, u64)>>> =
            Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, f, st) = (pids.clone(), floors.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while nap(&st, Duration::from_secs(2)) {
                let now: Vec<u32> = p.lock().map(|v| v.clone()).unwrap_or_default();
                for pid in now {
                    if let (Some((r, n)), Ok(mut f)) = (read_proc(pid), f.lock()) {
                        let e = f.entry(pid).or_insert((r, n));
                        *e = (e.0.min(r), e.1.min(n));
                    }
                }
            }
        });
        Poller {
            pids,
            floors,
            stop,
            handle: Some(handle),
        }
    }

    fn watch(&self, pids: &[u32]) {
        if let Ok(mut p) = self.pids.lock() {
            *p = pids.to_vec();
        }
    }

    /// The floor of `pid` since the last call, `now` included; starts a new interval.
    fn take_floor(&self, pid: u32, now: (u64, u64)) -> (u64, u64) {
        let Ok(mut f) = self.floors.lock() else {
            return now;
        };
        let floor = f
            .remove(&pid)
            .map_or(now, |(r, n)| (r.min(now.0), n.min(now.1)));
        f.insert(pid, now);
        floor
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// VmRSS, open descriptors and `/metrics` figures of a running daemon (`None` when it has exited).
fn proc_sample(
    d: &mut Daemon,
    ns: &Netns,
    metrics_port: u16,
    poller: &Poller,
) -> Option<ProcSample> {
    if d.check_alive().is_err() {
        return None;
    }
    let pid = d.pid();
    let (rss_kib, fds) = read_proc(pid)?;
    let (rss_min_kib, fds_min) = poller.take_floor(pid, (rss_kib, fds));
    let m = tunnel::scrape_at(ns, metrics_port);
    let get = |name: &str| m.as_deref().and_then(|t| tunnel::metric(t, name, ""));
    let errors = [
        "paqet_crypto_failures_total",
        "paqet_session_errors_total",
        "paqet_tx_failures_total",
    ]
    .iter()
    .map(|n| get(n))
    .try_fold(0.0, |a, v| v.map(|v| a + v));
    Some(ProcSample {
        pid,
        rss_kib,
        fds,
        rss_min_kib,
        fds_min,
        sessions: get("paqet_sessions"),
        streams: get("paqet_streams"),
        udp_channels: get("paqet_socks5_udp_channels"),
        errors: m.as_ref().and(errors),
    })
}

/// The link, its daemons and their configurations. Field order = drop order: daemons before the link.
struct Rig {
    poller: Poller,
    server: Option<Daemon>,
    client: Daemon,
    link: ImpairedLink,
    dir: TempDir,
    bin: String,
    mode: String,
    server_cfg: String,
    churn_cfg: String,
    restarts: u32,
}

impl Rig {
    fn new(opts: &Opts) -> Result<Self> {
        let dir = TempDir::new("soak")?;
        let link = ImpairedLink::with_prefix("pqb", "sk", CLEAN, None)
            .context("building the link (namespaces pqb<pid>sk{A,M,B})")?;
        let mac = |i: &str| -> Result<String> {
            Ok(link
                .m
                .exec(&["cat", &format!("/sys/class/net/{i}/address")])?
                .trim()
                .to_string())
        };
        let (mac_ma, mac_mb) = (mac(&link.m_a_if)?, mac(&link.m_b_if)?);
        tunnel::host_rules(&link.a, &link.b, link.b_ip)?;
        tunnel::stack_drop(&link.a, &link.b, link.b_ip, true)?;
        link.b
            .spawn(start_targets)
            .join()
            .map_err(|_| anyhow::anyhow!("the target thread panicked"))???;
        let kcp = match opts.window_mem {
            Some(m) => format!("mode = \"fast\"\nwindow_mem = {m}\n"),
            None => "mode = \"fast\"\n".to_string(),
        };
        let server_cfg = tunnel::server_toml(&link.b_if, link.b_ip, &mac_mb, &kcp, false);
        let client_cfg =
            tunnel::client_toml(&link.a_if, link.a_ip, link.b_ip, &mac_ma, &kcp, false);
        // The churn client: the same without forwards, on its own SOCKS5 and metrics ports.
        let churn_cfg = client_cfg[..client_cfg.find("[[forward]]").unwrap_or(client_cfg.len())]
            .replace(
                &format!("127.0.0.1:{METRICS_PORT}"),
                &format!("127.0.0.1:{CHURN_METRICS}"),
            )
            .replace(
                &format!("127.0.0.1:{SOCKS_PORT}"),
                &format!("127.0.0.1:{CHURN_SOCKS}"),
            );
        let server = Daemon::spawn(
            &link.b,
            &opts.bin,
            &dir.0,
            "server-0",
            &server_cfg,
            &opts.mode,
            None,
        )?;
        let client = Daemon::spawn(
            &link.a,
            &opts.bin,
            &dir.0,
            "client",
            &client_cfg,
            &opts.mode,
            None,
        )?;
        let poller = Poller::start();
        poller.watch(&[client.pid(), server.pid()]);
        let mut rig = Rig {
            poller,
            server: Some(server),
            client,
            link,
            dir,
            bin: opts.bin.clone(),
            mode: opts.mode.clone(),
            server_cfg,
            churn_cfg,
            restarts: 0,
        };
        if rig
            .wait_request(SOCKS_PORT, Duration::from_secs(30))
            .is_none()
        {
            bail!(
                "no request through the tunnel within 30 s\n--- client log ---\n{}\n--- server log ---\n{}",
                rig.client.log_tail(10),
                rig.server.as_ref().map(|s| s.log_tail(10)).unwrap_or_default()
            );
        }
        Ok(rig)
    }

    /// Tries requests through SOCKS5 port `socks` until one works (its delay) or `max` passed.
    fn wait_request(&mut self, socks: u16, max: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < max {
            let r = self
                .link
                .a
                .spawn(move || short_request(socks, 100, 0x42))
                .join();
            if matches!(r, Ok(Ok(Ok(())))) {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        None
    }

    fn sample(
        &mut self,
        t_min: f64,
        label: &str,
        loaded: bool,
        disturbed: bool,
        ops: Ops,
    ) -> Sample {
        let client = proc_sample(&mut self.client, &self.link.a, METRICS_PORT, &self.poller);
        let server = match self.server.as_mut() {
            Some(s) => proc_sample(s, &self.link.b, METRICS_PORT, &self.poller),
            None => None,
        };
        Sample {
            t_min,
            label: label.into(),
            loaded,
            disturbed,
            client,
            server,
            ops,
        }
    }

    /// Stops the server and starts a new one; returns how long the client took to carry requests again.
    fn restart_server(&mut self) -> Result<Option<Duration>> {
        self.server = None; // SIGTERM, then SIGKILL after 3 s
        self.restarts += 1;
        let t0 = Instant::now();
        let s = Daemon::spawn(
            &self.link.b,
            &self.bin,
            &self.dir.0,
            &format!("server-{}", self.restarts),
            &self.server_cfg,
            &self.mode,
            None,
        )?;
        self.poller.watch(&[self.client.pid(), s.pid()]);
        self.server = Some(s);
        Ok(self
            .wait_request(SOCKS_PORT, RECOVERY_MAX)
            .map(|_| t0.elapsed()))
    }

    /// Starts the churn client, carries 20 requests through it and stops it; true when all went through.
    fn churn(&mut self, k: &Counters) -> Result<bool> {
        let mut d = Daemon::spawn(
            &self.link.a,
            &self.bin,
            &self.dir.0,
            "churn",
            &self.churn_cfg,
            "pcap",
            None,
        )?;
        let up = self
            .wait_request(CHURN_SOCKS, Duration::from_secs(20))
            .is_some();
        let mut ok = up;
        if up {
            let r = self.link.a.spawn(|| {
                (0..20)
                    .filter(|i| short_request(CHURN_SOCKS, 512, *i as u8).is_ok())
                    .count()
            });
            ok = matches!(r.join(), Ok(Ok(20)));
        }
        d.check_alive()?;
        drop(d);
        bump(ok, &k.churn_ok, &k.churn_fail);
        Ok(ok)
    }

    fn logs(&self) -> String {
        format!(
            "--- client log ---\n{}\n--- server log ---\n{}",
            self.client.log_tail(10),
            self.server
                .as_ref()
                .map(|s| s.log_tail(10))
                .unwrap_or_default()
        )
    }
}

/// Sleeps until `t0 + secs`.
fn sleep_until(t0: Instant, secs: f64) {
    let due = t0 + Duration::from_secs_f64(secs);
    if let Some(w) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(w);
    }
}

/// Runs the soak; returns (markdown report, passed).
pub fn run(opts: &Opts) -> Result<(String, bool)> {
    if !sys::is_root() {
        bail!("`cargo xtask bench soak` needs root (network namespaces, veth, pcap/XDP, iptables, NFQUEUE)");
    }
    if opts.minutes < 3 {
        bail!("--minutes must be at least 3 (a lossy minute, a restart and quiet minutes)");
    }
    let n = opts.minutes;
    let lossy_k = (n / 4).max(1);
    let restart_k = (n / 2).max(lossy_k + 1).min(n - 1);
    let warmup_min = if n >= 10 { 2.0 } else { 1.0 };
    let started = chrono_now();
    let mut rig = Rig::new(opts)?;
    eprintln!(
        "bench soak: {n} min in {} mode; lossy minute {}, server restart in minute {}, settle {} s",
        opts.mode,
        lossy_k + 1,
        restart_k + 1,
        opts.settle_secs
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut samples = vec![rig.sample(0.0, "baseline (idle)", false, false, Ops::default())];
    let k = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let load = start_load(&rig.link.a, &k, &stop);
    let mut events = Events::default();
    let mut last_ops = k.ops();
    let mut notes = Vec::new();
    for m in 0..n {
        let base = 60.0 * m as f64;
        let mut label = Vec::new();
        let mut disturbed = false;
        if m == lossy_k {
            rig.link
                .set_spec(LOSSY)
                .context("switching the link to the lossy phase")?;
            label.push(format!(
                "lossy ({} % loss, {} ± {} ms)",
                LOSSY.loss_pct, LOSSY.delay_ms, LOSSY.jitter_ms
            ));
            disturbed = true;
        }
        if m == restart_k {
            sleep_until(t0, base + 20.0);
            eprintln!("bench soak: restarting the server");
            let rec = rig.restart_server()?;
            let at = (base + 20.0) / 60.0;
            events.restart = Some((at, rec.map(|d| d.as_secs_f64())));
            label.push(match rec {
                Some(d) => format!("server restart (recovered in {:.1} s)", d.as_secs_f64()),
                None => "server restart (NOT recovered)".into(),
            });
            if rec.is_none() {
                notes.push(format!("server restart: no recovery; {}", rig.logs()));
            }
            disturbed = true;
        } else {
            sleep_until(t0, base + 5.0);
            match rig.churn(&k) {
                Ok(true) => label.push("churn".into()),
                Ok(false) => label.push("churn (failed)".into()),
                Err(e) => {
                    notes.push(format!("minute {}: churn client: {e:#}", m + 1));
                    k.churn_fail.fetch_add(1, Ordering::Relaxed);
                    label.push("churn (failed)".into());
                }
            }
        }
        sleep_until(t0, base + 60.0);
        if m == lossy_k {
            rig.link.set_spec(CLEAN).context("ending the lossy phase")?;
        }
        let ops = k.ops();
        let s = rig.sample(
            (m + 1) as f64,
            &if label.is_empty() {
                "load".into()
            } else {
                label.join(", ")
            },
            true,
            disturbed,
            ops_delta(&last_ops, &ops),
        );
        last_ops = ops;
        eprintln!(
            "{}",
            table(std::slice::from_ref(&s)).lines().last().unwrap_or("")
        );
        samples.push(s);
        if rig.client.check_alive().is_err() {
            notes.push(format!("the client exited; {}", rig.logs()));
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in load {
        let _ = h.join();
    }
    let ops = k.ops();
    let t_stop = t0.elapsed().as_secs_f64() / 60.0;
    samples.push(rig.sample(
        t_stop,
        "load stopped",
        false,
        false,
        ops_delta(&last_ops, &ops),
    ));
    eprintln!("bench soak: load stopped; settling {} s", opts.settle_secs);
    std::thread::sleep(Duration::from_secs(opts.settle_secs));
    let t_end = t0.elapsed().as_secs_f64() / 60.0;
    samples.push(rig.sample(
        t_end,
        &format!("after {} s settle", opts.settle_secs),
        false,
        false,
        Ops::default(),
    ));
    events.final_request_ok = rig
        .wait_request(SOCKS_PORT, Duration::from_secs(10))
        .is_some();
    let errors_at_end = [
        ("client", tunnel::scrape_at(&rig.link.a, METRICS_PORT)),
        (
            "server (last process)",
            tunnel::scrape_at(&rig.link.b, METRICS_PORT),
        ),
    ]
    .map(|(who, t)| {
        let l = t.as_deref().map(error_lines).unwrap_or_default();
        format!(
            "- {who}: {}\n",
            if l.is_empty() {
                "none".to_string()
            } else {
                l.join(", ")
            }
        )
    })
    .concat();

    let checks = verdict(&samples, warmup_min, &events);
    let passed = checks.iter().all(|c| c.pass);
    let mut md = format!(
        "## Soak ({n} min, {} mode, started {started})\n\n\
         Client in one namespace, server in another, routed through a third (`paqet-testkit`'s impaired link); \
         fast mode, aes, auto windows, `window_mem` {}. Load through the client's SOCKS5: 3 threads of short echo streams, 6 long echo \
         streams (20–95 s each), one ≈ 1 MB/s download (45 s per stream), UDP ASSOCIATE flows (short associations, and \
         flows left idle past the 60 s idle timer); a second client process started, used and stopped every minute \
         (churn); minute {} lossy ({} % loss, {} ± {} ms each way); server restarted in minute {}. Counts per row are \
         for the minute before the sample; daemon errors are cumulative (crypto + session + TX failures). Warm-up {warmup_min} min.\n\n",
        opts.mode,
        opts.window_mem
            .map_or("32 MiB (default)".to_string(), |m| format!("{m} bytes")),
        lossy_k + 1,
        LOSSY.loss_pct,
        LOSSY.delay_ms,
        LOSSY.jitter_ms,
        restart_k + 1
    );
    md.push_str(&table(&samples));
    md.push_str(&format!(
        "\nNon-zero error and drop counters at the end (`/metrics`):\n\n{errors_at_end}"
    ));
    md.push_str("\n### Verdict\n\n");
    for c in &checks {
        md.push_str(&format!(
            "- {}: **{}** — {}\n",
            c.name,
            if c.pass { "ok" } else { "FAIL" },
            c.detail
        ));
    }
    md.push_str(&format!("\n**{}**\n", if passed { "PASS" } else { "FAIL" }));
    if !notes.is_empty() {
        md.push_str("\n### Problems\n\n");
        for n in &notes {
            md.push_str(&format!("- {}\n", n.replace('\n', "\n  ")));
        }
    }
    drop(rig);
    Ok((md, passed))
}

/// The non-zero samples of the error and drop families in `/metrics` text, as `name{labels} value`.
fn error_lines(text: &str) -> Vec<String> {
    const FAMILIES: [&str; 6] = [
        "paqet_crypto_failures_total",
        "paqet_session_errors_total",
        "paqet_tx_failures_total",
        "paqet_envelope_errors_total",
        "paqet_limit_rejections_total",
        "paqet_pcap_kernel_drops_total",
    ];
    text.lines()
        .filter(|l| FAMILIES.iter().any(|f| l.starts_with(f)))
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
        .map(|l| format!("`{l}`"))
        .collect()
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC` (from `date`, no extra crate).
fn chrono_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, rss_kib: u64, fds: u64) -> ProcSample {
        ProcSample {
            pid,
            rss_kib,
            fds,
            rss_min_kib: rss_kib,
            fds_min: fds,
            sessions: Some(1.0),
            streams: Some(0.0),
            udp_channels: Some(0.0),
            errors: Some(0.0),
        }
    }

    /// Baseline, `n` loaded minutes with `rss(minute)` for the client (server flat), stop, settle.
    fn run_of(n: usize, rss: impl Fn(usize) -> u64) -> Vec<Sample> {
        let mut v = vec![Sample {
            t_min: 0.0,
            label: "baseline".into(),
            client: Some(proc(10, 20_000, 12)),
            server: Some(proc(20, 20_000, 10)),
            ..Default::default()
        }];
        for m in 1..=n {
            v.push(Sample {
                t_min: m as f64,
                label: "load".into(),
                loaded: true,
                client: Some(ProcSample {
                    streams: Some(9.0),
                    ..proc(10, rss(m), 30)
                }),
                server: Some(proc(20, 30_000, 28)),
                ops: Ops {
                    short: (1000, 0),
                    ..Ops::default()
                },
                ..Default::default()
            });
        }
        for t in [n as f64 + 0.1, n as f64 + 1.6] {
            v.push(Sample {
                t_min: t,
                label: "after".into(),
                client: Some(proc(10, rss(n), 12)),
                server: Some(proc(20, 30_000, 10)),
                ..Default::default()
            });
        }
        v
    }

    fn ok_events() -> Events {
        Events {
            restart: None,
            final_request_ok: true,
        }
    }

    fn failed(c: &[Check]) -> Vec<String> {
        c.iter()
            .filter(|c| !c.pass)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }

    #[test]
    fn error_lines_keep_non_zero_error_samples() {
        let t = "# HELP paqet_session_errors_total x\npaqet_session_errors_total{reason=\"no_session\"} 3\n\
                 paqet_session_errors_total{reason=\"replay\"} 0\npaqet_streams 4\npaqet_tx_failures_total{reason=\"error\"} 1\n";
        assert_eq!(
            error_lines(t),
            vec![
                "`paqet_session_errors_total{reason=\"no_session\"} 3`",
                "`paqet_tx_failures_total{reason=\"error\"} 1`"
            ]
        );
    }

    #[test]
    fn slope_of_a_line_and_of_too_little() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&pts).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(slope(&pts[..1]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn growth_skips_the_warm_up_and_fits_the_last_half() {
        // Fast growth during warm-up (minutes 1-2), flat afterwards.
        let pts: Vec<(f64, f64)> = (1..=10)
            .map(|m| (m as f64, if m <= 2 { 1000.0 * m as f64 } else { 5000.0 }))
            .collect();
        let g = growth(&pts, 0.0, 3.0).unwrap();
        assert_eq!((g.samples, g.first, g.last), (8, 5000.0, 5000.0));
        assert_eq!(g.slope, 0.0);
        assert_eq!(growth(&pts[..3], 0.0, 2.0), None, "too few after warm-up");
    }

    #[test]
    fn flat_memory_passes() {
        let c = verdict(&run_of(15, |_| 40_000), 2.0, &ok_events());
        assert!(failed(&c).is_empty(), "{:?}", failed(&c));
    }

    #[test]
    fn a_steady_leak_fails_and_a_one_off_step_does_not() {
        // 1 MiB per minute, every minute: slope and growth both over the thresholds.
        let c = verdict(&run_of(15, |m| 40_000 + 1024 * m as u64), 2.0, &ok_events());
        let f = failed(&c);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("client VmRSS growth"), "{f:?}");
        // A 30 MiB step in minute 4 (a lossy phase filling buffers), flat afterwards.
        let c = verdict(
            &run_of(15, |m| if m < 4 { 40_000 } else { 70_000 }),
            2.0,
            &ok_events(),
        );
        assert!(failed(&c).is_empty(), "{:?}", failed(&c));
        // A slow creep below the growth threshold over the run.
        let c = verdict(&run_of(15, |m| 40_000 + 600 * m as u64), 2.0, &ok_events());
        assert!(failed(&c).is_empty(), "{:?}", failed(&c));
    }

    #[test]
    fn leftovers_fail() {
        let mut v = run_of(5, |_| 40_000);
        let last = v.last_mut().unwrap();
        last.server.as_mut().unwrap().sessions = Some(2.0);
        last.client.as_mut().unwrap().fds = 12 + FD_SLACK + 1;
        last.client.as_mut().unwrap().udp_channels = Some(1.0);
        let f = failed(&verdict(&v, 1.0, &ok_events()));
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].contains("client")
                && f[0].contains("fds 12 → 17")
                && f[0].contains("UDP channels 0 → 1")
        );
        assert!(f[1].contains("server") && f[1].contains("sessions 1 → 2"));
        // A missing metrics scrape at the end is a failure too, not a pass.
        let mut v = run_of(5, |_| 40_000);
        v.last_mut().unwrap().client.as_mut().unwrap().streams = None;
        assert_eq!(failed(&verdict(&v, 1.0, &ok_events())).len(), 1);
    }

    #[test]
    fn restart_recovery_dead_tunnel_and_quiet_failures() {
        let v = run_of(6, |_| 40_000);
        let e = Events {
            restart: Some((3.3, None)),
            final_request_ok: false,
        };
        let f = failed(&verdict(&v, 1.0, &e));
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("client recovers") && f[1].starts_with("tunnel works"));
        let mut v = run_of(6, |_| 40_000);
        v[2].ops.short = (100, 500);
        let f = failed(&verdict(&v, 1.0, &ok_events()));
        assert!(
            f.len() == 1 && f[0].starts_with("failures in quiet minutes"),
            "{f:?}"
        );
        // The same failures in a disturbed minute are expected.
        v[2].disturbed = true;
        assert!(failed(&verdict(&v, 1.0, &ok_events())).is_empty());
    }

    #[test]
    fn a_restarted_server_is_judged_per_process() {
        // Server pid 20 grows until the restart at minute 5, pid 21 afterwards is flat: the first is judged
        // on its own samples, the second from its restart on.
        let mut v = run_of(12, |_| 40_000);
        for s in v.iter_mut().filter(|s| s.loaded) {
            let m = s.t_min as u64;
            s.server = Some(if m <= 5 {
                proc(20, 30_000 + 4096 * m, 28)
            } else {
                proc(21, 25_000, 28)
            });
        }
        let e = Events {
            restart: Some((5.3, Some(4.0))),
            final_request_ok: true,
        };
        let c = verdict(&v, 1.0, &e);
        let f = failed(&c);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("server VmRSS growth (pid 20)"), "{f:?}");
        assert!(c
            .iter()
            .any(|c| c.name == "server VmRSS growth (pid 21)" && c.pass));
        let t = table(&v);
        assert_eq!(t.lines().count(), 2 + v.len());
        assert!(t.contains("| 21 |"));
    }
}
