//! An active prober against a server on the upstream wire (pcap mode, guard off): recorded client
//! datagrams replayed from a third address, after a server restart, and the first datagram of an older
//! session spoofed from the live client's address and port. The server must send the prober nothing, the
//! target must see no re-run request, and the live client must keep working (docs/security.md).
//!
//! Root only (network namespaces, tcpdump, an AF_PACKET socket); every packet stays in the test's own
//! namespaces.
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw;
use common::*;
use paqet_testkit::netns::Netns;

/// The prober's address (on the client's link; nothing configures it, frames are injected raw).
const PROBER: Ipv4Addr = Ipv4Addr::new(10, 216, 0, 77);

/// A TCP target in the server namespace that answers every HTTP request and counts them by path.
struct Target {
    port: u16,
    paths: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Target {
    fn start(ns: &Netns) -> Target {
        let l = in_ns(ns, || {
            TcpListener::bind("127.0.0.1:0").expect("bind target")
        });
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().unwrap().port();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (paths.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                if let Some(path) = text.split_whitespace().nth(1) {
                    p.lock().unwrap().push(path.to_owned());
                }
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        Target {
            port,
            paths,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A tcpdump writing a pcap file (packet-buffered), stopped on drop.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, dev: &str, file: PathBuf, filter: &str) -> Capture {
        let err = file.with_extension("err");
        let child = ns
            .command("tcpdump")
            .args(["-i", dev, "--immediate-mode", "-U", "-n", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("tcpdump stderr"))
            .spawn()
            .expect("spawn tcpdump");
        let c = Capture { child, file };
        let up = poll(Duration::from_secs(10), || {
            std::fs::read_to_string(&err)
                .ok()
                .filter(|t| t.contains("listening on"))
        });
        assert!(
            up.is_some(),
            "tcpdump did not start: {:?}",
            std::fs::read_to_string(&err)
        );
        c
    }

    /// The frames written so far.
    fn frames(&self) -> Vec<Vec<u8>> {
        read_pcap(&self.file)
    }

    fn stop(&mut self) -> Vec<Vec<u8>> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self.frames()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The frames of a classic pcap file (microsecond or nanosecond, either byte order).
fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap_or_default();
    if b.len() < 24 {
        return Vec::new();
    }
    let le = matches!(&b[..4], [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]);
    let u32_at = |o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let incl = u32_at(off + 8) as usize;
        let start = off + 16;
        if start + incl > b.len() {
            break;
        }
        out.push(b[start..start + incl].to_vec());
        off = start + incl;
    }
    out
}

/// The client's datagrams to the server's tunnel port (frames with a payload), in capture order.
fn client_datagrams(
    frames: &[Vec<u8>],
    client: Ipv4Addr,
    server: SocketAddr,
) -> Vec<(u16, Vec<u8>)> {
    frames
        .iter()
        .filter_map(|f| {
            let p = raw::parse4(f)?;
            (p.src.ip() == client && p.dst == server && p.payload_len > 0)
                .then(|| (p.src.port(), f.clone()))
        })
        .collect()
}

/// Waits (metrics are published periodically) until the server counted at least `n` refused replays;
/// the count seen last.
fn replay_drops(ns: &Netns, n: f64) -> f64 {
    let series = "paqet_session_errors_total{reason=\"replay\"}";
    let mut last = 0.0;
    poll(Duration::from_secs(5), || {
        last = series_sum(&scrape(ns), series);
        (last >= n).then_some(())
    });
    last
}

/// Waits until the server's metrics answer (it started).
fn wait_metrics(ns: &Netns) {
    let up = poll(Duration::from_secs(15), || {
        http_get(ns, METRICS_PORT, "/metrics")
            .ok()
            .filter(|(s, _)| *s == 200)
    });
    assert!(up.is_some(), "server metrics not up");
}

#[test]
fn replays_and_spoofed_session_starts_get_no_answer() {
    if skip(
        "replays_and_spoofed_session_starts_get_no_answer",
        &["tcpdump", "curl"],
    ) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let mut opts = Opts::new((Mode::Pcap, Mode::Pcap));
    opts.conn = 1;
    // smux keep-alive timeout: how long the client takes to notice its session died with the server.
    opts.smuxktimeout = 4;
    let o = opts.clone();
    // The recording starts before the client dials (inside the config hook, which runs before the daemons).
    let recording: Arc<Mutex<Option<Capture>>> = Arc::default();
    let rec = recording.clone();
    let hook = move |net: &Net, http: &HttpServer, udp: &UdpEcho, dir: &Path| {
        let filter = format!("tcp and host {} and port {TUNNEL_PORT}", net.server_ip);
        *rec.lock().unwrap() = Some(Capture::start(
            net.client(),
            &net.client_if,
            dir.join("session.pcap"),
            &filter,
        ));
        let upstream = "[transport.kcp]\nguard = false\n";
        let server = Tunnel::server_config(net, &o).replace(
            "[transport.kcp]\n",
            &format!(
                "{upstream}replay_filter = \"{}\"\n",
                dir.join("replay.bin").display()
            ),
        );
        let client = Tunnel::client_config(net, &o, http, udp, ClientPorts::MAIN, KEY)
            .replace("[transport.kcp]\n", upstream);
        (server, client)
    };
    let mut t = Tunnel::start_with("rply", opts, Some(&hook));
    let target = Target::start(t.net.server());
    let url = |p: &str| format!("http://127.0.0.1:{}/{p}", target.port);
    let server_addr = t.net.server_addr();
    let (cns, cif, cip) = (t.net.client(), t.net.client_if.clone(), t.net.client_ip);

    // The real client fetches once; the whole session so far is recorded.
    let f = fetch(cns, t.socks(), &url("first"), 15);
    assert!(f.ok, "first fetch: {}", f.stderr);
    std::thread::sleep(Duration::from_millis(300));
    let recorded = recording.lock().unwrap().take().expect("recording").stop();
    let session = client_datagrams(&recorded, cip, server_addr);
    assert!(
        session.len() >= 2,
        "recorded {} client datagrams of {} frames; first: {:?}; tcpdump: {:?}",
        session.len(),
        recorded.len(),
        recorded
            .first()
            .and_then(|f| raw::parse4(f))
            .map(|p| (p.src, p.dst, p.payload_len)),
        std::fs::read_to_string(t.dir.path().join("session.err")),
    );
    let (old_port, first) = session[0].clone();
    assert!(
        session.iter().all(|(p, _)| *p == old_port),
        "one session (conn = 1)"
    );
    assert_eq!(target.requests(), ["/first"]);

    // The prober's side: anything from the server's tunnel port to an address other than the client's.
    let mut answers = Capture::start(
        cns,
        &cif,
        t.dir.path().join("prober.pcap"),
        &format!(
            "tcp and src host {} and src port {TUNNEL_PORT} and not dst host {cip}",
            t.net.server_ip
        ),
    );
    // The client's traffic from here on (to learn the port of its next session).
    let live = Capture::start(
        cns,
        &cif,
        t.dir.path().join("live.pcap"),
        &format!(
            "tcp and src host {cip} and dst host {} and dst port {TUNNEL_PORT}",
            t.net.server_ip
        ),
    );
    let from_prober = |port: u16| SocketAddr::from((PROBER, port));
    let all: Vec<Vec<u8>> = session.iter().map(|(_, f)| f.clone()).collect();
    let probe = |port: u16| {
        // The first datagram alone, then the whole session, from the prober's address.
        raw::inject(
            cns,
            &cif,
            vec![raw::resourced(&first, from_prober(port))],
            Duration::ZERO,
        );
        std::thread::sleep(Duration::from_millis(500));
        let frames = all
            .iter()
            .map(|f| raw::resourced(f, from_prober(port + 1)))
            .collect();
        raw::inject(cns, &cif, frames, Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(1000));
    };
    probe(41000);
    let answered = answers.frames();
    assert!(
        answered.is_empty(),
        "the server answered the prober: {:?}",
        answered
            .iter()
            .filter_map(|f| raw::parse4(f).map(|p| (p.src, p.dst, p.payload_len)))
            .collect::<Vec<_>>()
    );
    assert_eq!(target.requests(), ["/first"], "a replay re-ran a request");
    assert!(replay_drops(t.net.server(), 2.0) >= 2.0, "replays counted");

    // A server restart (SIGTERM: the filter is saved) must not re-arm the recorded session.
    assert!(t.server.terminate(), "server stopped by SIGTERM");
    assert!(
        t.dir.path().join("replay.bin").exists(),
        "filter persisted at shutdown"
    );
    let cfg = std::fs::read_to_string(t.dir.path().join("server.toml")).unwrap();
    let manage = run_supports("--manage-firewall");
    t.server = Daemon::spawn(
        t.net.server(),
        t.dir.path(),
        "server2",
        &cfg,
        Mode::Pcap,
        manage,
    );
    wait_metrics(t.net.server());
    assert!(
        t.server.log_text().contains("replay filter loaded"),
        "{}",
        t.server.log_text()
    );
    probe(42000);
    assert!(
        replay_drops(t.net.server(), 2.0) >= 2.0,
        "replays refused after the restart"
    );

    // The client notices its session is gone and dials a new one (new conv, maybe a new port).
    let back = poll(Duration::from_secs(30), || {
        t.probe(ClientPorts::MAIN.fwd_http).ok()
    });
    assert!(back.is_some(), "client back after the server restart");
    let live_port = client_datagrams(&live.frames(), cip, server_addr)
        .last()
        .map(|(p, _)| *p)
        .expect("the client's new session");
    let log = t.server.log_text();
    assert!(
        log.contains(&format!("new session src={cip}:{live_port}")),
        "the live session is {cip}:{live_port}:\n{log}"
    );
    // Spoof: the older session's first datagram from the live client's address and port.
    raw::inject(
        cns,
        &cif,
        vec![raw::resourced(&first, SocketAddr::from((cip, live_port)))],
        Duration::ZERO,
    );
    std::thread::sleep(Duration::from_millis(300));
    let f = fetch(cns, t.socks(), &url("second"), 10);
    assert!(f.ok, "fetch right after the spoof: {}", f.stderr);
    let log = t.server.log_text();
    assert!(
        !log.contains("replacing session"),
        "live session replaced:\n{log}"
    );
    assert!(
        replay_drops(t.net.server(), 3.0) >= 3.0,
        "spoof counted as a replay"
    );

    let answered = answers.stop();
    assert!(
        answered.is_empty(),
        "the server answered the prober: {:?}",
        answered
            .iter()
            .filter_map(|f| raw::parse4(f).map(|p| (p.src, p.dst)))
            .collect::<Vec<_>>()
    );
    let reqs = target.requests();
    assert_eq!(
        reqs.iter().filter(|p| *p == "/first").count(),
        1,
        "no re-run request: {reqs:?}"
    );
    assert_eq!(reqs.last().map(String::as_str), Some("/second"));
    eprintln!(
        "probe_replay: {} recorded datagrams replayed twice (+ restart), spoof refused, {} requests at the \
         target, {:.1} s",
        session.len(),
        reqs.len(),
        t0.elapsed().as_secs_f64()
    );
    drop(live);
}
