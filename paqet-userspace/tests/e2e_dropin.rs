//! Drop-in (issue 12 item 1): an upstream YAML config used as is meets no limit upstream does not have.
//!
//! - A server run with `-c server.yaml` and a client from `config import client.yaml` (both upstream-style
//!   YAML, the client with `transport.conn: 1`) carry 1,000 concurrent SOCKS5 TCP streams through one
//!   session: each moves a little data both ways (checked), all are held open at once (the server counts
//!   them, one session), then all close; nothing is refused and `paqet_limit_refusals_total` stays 0.
//!   Run in pcap and in XDP generic mode.
//! - A TOML server with a small `max_streams_per_session` refuses the streams over it: the log names the
//!   key and its value, and `paqet_limit_refusals_total{key=...}` counts them.
//!
//! Root only (network namespaces, pcap, XDP); skipped otherwise. Every wait is bounded.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Concurrent streams through the one session.
const STREAMS: usize = 1000;
/// Bytes each stream sends (and gets back) per round.
const CHUNK: usize = 512;
/// The client's SOCKS5 port (loopback of the client namespace).
const SOCKS: u16 = 1080;
/// The refusal series of the per-session stream limit.
const PER_SESSION: &str =
    "paqet_limit_refusals_total{key=\"transport.kcp.max_streams_per_session\"}";

/// Raises this process's soft `RLIMIT_NOFILE` to the hard limit: the test holds both ends of every stream
/// (the SOCKS5 clients and the echo server's connections), over 2,000 descriptors.
fn raise_nofile() -> u64 {
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = rl.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
        rl.rlim_cur as u64
    }
}

/// Upstream paqet's §2.4 server example as upstream writes it, adapted to the topology, plus
/// `metrics.listen` (which sets no limit) so the test can read the counters.
fn server_yaml(net: &Net) -> String {
    format!(
        r#"role: "server"
log: {{ level: "info" }}
listen: {{ addr: ":{TUNNEL_PORT}" }}
network:
  interface: "{sif}"
  ipv4: {{ addr: "{sip}:{TUNNEL_PORT}", router_mac: "{sgw}" }}
  tcp:  {{ local_flag: ["PA"] }}
  pcap: {{ sockbuf: 8388608 }}
transport:
  protocol: "kcp"
  kcp: {{ mode: "fast", mtu: 1350, rcvwnd: 1024, sndwnd: 1024, block: "aes",
         key: "{KEY}", smuxbuf: 4194304, streambuf: 2097152,
         smuxkalive: 2, smuxktimeout: 8 }}
metrics: {{ listen: "127.0.0.1:{METRICS_PORT}" }}
"#,
        sif = net.server_if,
        sip = net.server_ip,
        sgw = net.server_gw_mac,
    )
}

/// Upstream paqet's §2.3 client example, adapted: one connection (`transport.conn: 1`), a SOCKS5 listener.
fn client_yaml(net: &Net) -> String {
    format!(
        r#"role: "client"
log: {{ level: "info" }}
socks5:
  - listen: "127.0.0.1:{SOCKS}"
network:
  interface: "{cif}"
  ipv4: {{ addr: "{cip}:0", router_mac: "{cgw}" }}
  tcp:  {{ local_flag: ["PA"], remote_flag: ["PA"] }}
  pcap: {{ sockbuf: 4194304 }}
server: {{ addr: "{sip}:{TUNNEL_PORT}" }}
transport:
  protocol: "kcp"
  conn: 1
  kcp:
    mode: "fast"
    mtu: 1350
    rcvwnd: 512
    sndwnd: 128
    block: "aes"
    key: "{KEY}"
    smuxbuf: 4194304
    streambuf: 2097152
    smuxkalive: 2
    smuxktimeout: 8
"#,
        cif = net.client_if,
        cip = net.client_ip,
        cgw = net.client_gw_mac,
        sip = net.server_ip,
    )
}

/// Writes `text` to `dir/name` with mode 0600 (it holds the key); returns the path.
fn write_private(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    std::fs::set_permissions(
        &p,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .expect("chmod config");
    p.to_string_lossy().into_owned()
}

/// `paqet-dp config import FILE` → the TOML it prints.
fn import(yaml_path: &str) -> String {
    let out = std::process::Command::new(bin())
        .args(["config", "import", yaml_path])
        .output()
        .expect("run config import");
    assert!(
        out.status.success(),
        "config import {yaml_path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 TOML")
}

/// `run -c CONFIG --mode MODE` (plus `--manage-firewall` in pcap mode when the binary has it; otherwise
/// the test installs the rules).
fn run_args(config: &str, mode: Mode) -> Vec<String> {
    let mut a = vec![
        "run".to_owned(),
        "-c".into(),
        config.to_owned(),
        "--mode".into(),
        mode.arg().into(),
    ];
    if mode.needs_firewall() && run_supports("--manage-firewall") {
        a.push("--manage-firewall".into());
    }
    a
}

/// What stream `i` sends in round `round`.
fn payload(i: usize, round: u64) -> Vec<u8> {
    pattern_bytes(round * 1_000_003 + i as u64, CHUNK)
}

/// Sends round `round` on every stream first, then reads every echo back: all streams are in flight at
/// once. Returns the indices whose echo failed or differed, with the reason of the first one.
fn echo_all(conns: &mut [TcpStream], round: u64) -> (Vec<usize>, String) {
    let mut bad = Vec::new();
    let mut first = String::new();
    let mut fail = |i: usize, why: String, bad: &mut Vec<usize>| {
        if first.is_empty() {
            first = format!("stream {i}: {why}");
        }
        bad.push(i);
    };
    let mut sent = vec![false; conns.len()];
    for (i, c) in conns.iter_mut().enumerate() {
        match c.write_all(&payload(i, round)) {
            Ok(()) => sent[i] = true,
            Err(e) => fail(i, format!("write: {e}"), &mut bad),
        }
    }
    for (i, c) in conns.iter_mut().enumerate() {
        if !sent[i] {
            continue;
        }
        let mut got = vec![0u8; CHUNK];
        match c.read_exact(&mut got) {
            Ok(()) if got == payload(i, round) => {}
            Ok(()) => fail(i, "echo differs".into(), &mut bad),
            Err(e) => fail(i, format!("read: {e}"), &mut bad),
        }
    }
    (bad, first)
}

/// One sample of `series` in the daemon's `/metrics` (0 when absent).
fn sample(ns: &paqet_testkit::netns::Netns, series: &str) -> f64 {
    series_sum(&scrape(ns), series)
}

/// The YAML server and client of `mode`, 1,000 streams through one session.
fn thousand_streams(tag: &str, mode: Mode) {
    let nofile = raise_nofile();
    assert!(
        nofile >= 4 * STREAMS as u64,
        "RLIMIT_NOFILE hard limit {nofile} too low for the test"
    );
    let net = Net::direct(tag);
    let dir = TempDir::new(tag);
    if mode.needs_firewall() && !run_supports("--manage-firewall") {
        net.apply_firewall(true, true);
    }
    let echo = tcp_echo(net.server());
    let server_cfg = write_private(dir.path(), "server.yaml", &server_yaml(&net));
    let client_yaml_path = write_private(dir.path(), "client.yaml", &client_yaml(&net));
    // The imported TOML spells the YAML defaults out: no limit upstream lacks.
    let server_toml = import(&server_cfg);
    for line in [
        "max_sessions = -1",
        "max_streams_total = -1",
        "max_streams_per_session = -1",
        "header_timeout = 3600",
        "guard = false",
    ] {
        assert!(server_toml.contains(line), "{line} missing:\n{server_toml}");
    }
    let client_cfg = write_private(dir.path(), "client.toml", &import(&client_yaml_path));
    let mut server = Daemon::spawn_args(
        net.server(),
        dir.path(),
        "server",
        &run_args(&server_cfg, mode),
    );
    let mut client = Daemon::spawn_args(
        net.client(),
        dir.path(),
        "client",
        &run_args(&client_cfg, mode),
    );

    let proxy = SocketAddr::from(([127, 0, 0, 1], SOCKS));
    // Ready: one stream echoes through the tunnel.
    let ready = poll(READY_WITHIN, || {
        server.assert_running();
        client.assert_running();
        in_ns(net.client(), move || {
            let mut c = socks5_connect(proxy, echo).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            let (bad, _) = echo_all(std::slice::from_mut(&mut c), 0);
            bad.is_empty().then_some(())
        })
    });
    assert!(ready.is_some(), "tunnel not ready within {READY_WITHIN:?}");

    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<Duration, String>>();
    // The streams live on a thread inside the client namespace, held open until the main thread has
    // checked the server's view of them.
    let holder = net.client().spawn(move || {
        let mut conns = Vec::with_capacity(STREAMS);
        for i in 0..STREAMS {
            match socks5_connect(proxy, echo) {
                Ok(c) => conns.push(c),
                Err(e) => {
                    let _ = done_tx.send(Err(format!("SOCKS5 CONNECT {i}: {e}")));
                    return;
                }
            }
        }
        let opened = t0.elapsed();
        for round in 1..=2 {
            let (bad, first) = echo_all(&mut conns, round);
            if !bad.is_empty() {
                let _ = done_tx.send(Err(format!(
                    "round {round}: {} of {STREAMS} streams failed; first: {first}",
                    bad.len()
                )));
                return;
            }
        }
        let _ = done_tx.send(Ok(opened));
        // Hold every stream until told (bounded), then close them all at once.
        let _ = rx.recv_timeout(Duration::from_secs(60));
        drop(conns);
    });
    let outcome = done_rx
        .recv_timeout(Duration::from_secs(90))
        .unwrap_or_else(|_| Err("the streams did not finish within 90 s".into()));
    let opened = outcome.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    eprintln!(
        "{mode:?}: {STREAMS} streams opened in {opened:?}, echoed twice in {:?}",
        t0.elapsed()
    );
    // All held at once: the server has them in one session (the gauges are published every 500 ms).
    let held = poll(Duration::from_secs(5), || {
        let s = scrape(net.server());
        (series_sum(&s, "paqet_streams") >= STREAMS as f64).then_some(s)
    });
    let s = held.unwrap_or_else(|| {
        panic!(
            "{mode:?}: the server holds {} streams, expected >= {STREAMS}",
            sample(net.server(), "paqet_streams")
        )
    });
    let sessions = series_sum(&s, "paqet_sessions{role=\"server\"}");
    assert_eq!(sessions, 1.0, "{mode:?}: one session expected:\n{s}");
    assert_eq!(
        metric_sum(&s, "paqet_limit_refusals_total"),
        0.0,
        "{mode:?}: a limit refused something:\n{s}"
    );
    assert_eq!(metric_sum(&s, "paqet_limit_rejections_total"), 0.0);
    assert!(
        s.contains(PER_SESSION),
        "{mode:?}: the per-limit series are exported:\n{s}"
    );
    let _ = tx.send(());
    holder
        .join()
        .expect("holder thread panicked")
        .expect("enter client namespace");
    // Closed: the server lets go of every stream.
    let drained = poll(Duration::from_secs(30), || {
        (sample(net.server(), "paqet_streams") == 0.0).then_some(())
    });
    assert!(
        drained.is_some(),
        "{mode:?}: server still holds {} streams 30 s after the close",
        sample(net.server(), "paqet_streams")
    );
    server.assert_running();
    client.assert_running();
    let log = server.log_text();
    assert!(
        !log.contains("refused:"),
        "{mode:?}: the server refused something:\n{log}"
    );
    eprintln!("{mode:?}: total {:?}", t0.elapsed());
}

#[test]
fn yaml_config_carries_1000_streams_through_one_session_pcap() {
    if skip(
        "yaml_config_carries_1000_streams_through_one_session_pcap",
        &["iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    thousand_streams("dyp", Mode::Pcap);
}

#[test]
fn yaml_config_carries_1000_streams_through_one_session_xdp_generic() {
    if skip(
        "yaml_config_carries_1000_streams_through_one_session_xdp_generic",
        &["ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    thousand_streams("dyx", Mode::XdpGeneric);
}

/// A TOML server keeps its protective defaults, here a small per-session cap: the streams over it are
/// refused, the log names the key and its value, the per-key counter counts them.
#[test]
fn toml_stream_cap_refusal_is_logged_and_counted() {
    if skip(
        "toml_stream_cap_refusal_is_logged_and_counted",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    raise_nofile();
    const CAP: usize = 8;
    const OPEN: usize = 20;
    let mut opts = Opts::new((Mode::Pcap, Mode::Pcap));
    opts.conn = 1;
    opts.server_kcp_extra = format!("max_streams_per_session = {CAP}");
    let t = Tunnel::start("dtc", opts);
    let echo = tcp_echo(t.net.server());
    let proxy = SocketAddr::from(([127, 0, 0, 1], ClientPorts::MAIN.socks));
    let before = sample(t.net.server(), PER_SESSION);
    let (ok, failed) = in_ns(t.net.client(), move || {
        let mut conns: Vec<TcpStream> = (0..OPEN)
            .map(|i| {
                let c = socks5_connect(proxy, echo)
                    .unwrap_or_else(|e| panic!("SOCKS5 CONNECT {i}: {e}"));
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                c
            })
            .collect();
        let (bad, _) = echo_all(&mut conns, 1);
        (OPEN - bad.len(), bad.len())
    });
    assert_eq!(
        (ok, failed),
        (CAP, OPEN - CAP),
        "streams echoed / refused with max_streams_per_session = {CAP}"
    );
    let counted = poll(Duration::from_secs(5), || {
        let v = sample(t.net.server(), PER_SESSION) - before;
        (v >= (OPEN - CAP) as f64).then_some(v)
    });
    assert_eq!(
        counted,
        Some((OPEN - CAP) as f64),
        "{PER_SESSION} after {} refusals",
        OPEN - CAP
    );
    let s = scrape(t.net.server());
    assert_eq!(
        series_sum(
            &s,
            "paqet_limit_refusals_total{key=\"transport.kcp.max_streams_total\"}"
        ),
        0.0
    );
    assert!(
        series_sum(&s, "paqet_limit_rejections_total{limit=\"max_streams\"}")
            >= (OPEN - CAP) as f64,
        "the older family still counts them:\n{s}"
    );
    let line = format!(
        "stream refused: transport.kcp.max_streams_per_session = {CAP} reached (session {}:",
        t.net.client_ip
    );
    let log = t.server.log_text();
    assert!(log.contains(&line), "no {line:?} in the server log:\n{log}");
    // Rate-limited: far fewer lines than refusals.
    assert!(
        log.matches("stream refused: transport.kcp.max_streams_per_session")
            .count()
            < OPEN - CAP,
        "refusal lines are rate-limited:\n{log}"
    );
}
