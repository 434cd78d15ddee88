//! The ops HTTP server end to end on 127.0.0.1: metrics text, health, readiness, pprof profiles, 404.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use flate2::read::GzDecoder;
use paqet::ops::metrics::{
    AfXdpStats, CcSnapshot, DataPathMode, RoleLabel, ServerSnapshot, Snapshot, WorkerSnapshot,
    METRIC_NAMES,
};
use paqet::ops::pprof::TrackingAlloc;
use paqet::ops::{readiness, spawn_ops_thread, OpsState};
use paqet::proto::cc::{CcAlgorithm, CcStats};
use paqet_common::XdpCounter;
use pprof::protos::{Message, Profile};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// Congestion-control figures of worker `i`: one BBR session from peer 10.0.0.`i`:5000.
fn fake_cc(i: u64) -> CcSnapshot {
    let mut cc = CcSnapshot::default();
    let stats = CcStats {
        algorithm: CcAlgorithm::Bbr,
        state: "probe_bw",
        pacing_rate: 1_250_000 * (i + 1),
        btl_bw: 1_000_000 * (i + 1),
        delivery_rate: 1_000_000 * (i + 1),
        min_rtt_ms: 20,
        srtt_ms: 25,
        cwnd_bytes: 50_000,
        inflight_bytes: 40_000,
        bytes_sent: 1_100_000,
        bytes_delivered: 1_000_000,
        loss_ratio: 0.01,
        retrans_ratio: 0.1,
        spurious_retrans: 5,
        window_limited_by: Some("sndwnd"),
        ..CcStats::default()
    };
    cc.add_session(format!("10.0.0.{i}:5000").parse().unwrap(), &stats);
    cc.window_limited_total = [1, 0];
    cc.finish();
    cc
}

/// A snapshot exercising every family (two workers, XDP and AF_XDP counters present).
fn fake_snapshot() -> Snapshot {
    let w = |i: u64| WorkerSnapshot {
        sessions: 1 + i,
        streams: 3,
        rx_packets: 100 * (i + 1),
        rx_bytes: 100_000,
        tx_packets: 90,
        tx_bytes: 80_000,
        guard_drops: 2,
        pcap_ps_drop: 1,
        afxdp: Some(AfXdpStats {
            rx_dropped: 1,
            rx_ring_full: 2,
            fill_ring_empty: 3,
            tx_invalid_descs: 0,
        }),
        srtt_seconds: vec![0.002, 0.004],
        cc: fake_cc(i),
        servers: vec![ServerSnapshot {
            server: "10.0.0.2:9999".to_string(),
            up: true,
            slots: 1,
            sessions: 1,
            dial_failures: 0,
        }],
        ..Default::default()
    };
    let mut xdp = [0u64; XdpCounter::COUNT as usize];
    xdp[XdpCounter::Seen as usize] = 500;
    Snapshot {
        role: RoleLabel::Client,
        mode: DataPathMode::XdpNative,
        workers: vec![w(0), w(1)],
        xdp: Some(xdp),
    }
}

struct Server {
    addr: SocketAddr,
    state: Arc<OpsState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ready: Arc<AtomicBool>, pprof: bool) -> Server {
        let state = Arc::new(
            OpsState::new(
                Box::new(fake_snapshot),
                Box::new(move || {
                    let sessions = u64::from(ready.load(Ordering::SeqCst));
                    readiness(true, RoleLabel::Client, sessions)
                }),
            )
            .with_pprof(pprof),
        );
        let (addr, thread) = spawn_ops_thread("127.0.0.1:0".parse().unwrap(), state.clone())
            .expect("ops server starts");
        Server {
            addr,
            state,
            thread: Some(thread),
        }
    }

    /// One request; returns (status, headers, body).
    fn get(&self, target: &str) -> (u16, String, Vec<u8>) {
        self.request(&format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    }

    fn request(&self, raw: &str) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(self.addr).expect("connect to ops server");
        s.write_all(raw.as_bytes()).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head ends");
        let head = String::from_utf8(resp[..end].to_vec()).unwrap();
        let body = resp[end + 4..].to_vec();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length header")
            .parse()
            .unwrap();
        assert_eq!(len, body.len(), "Content-Length matches the body");
        (status, head, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn gunzip_profile(body: &[u8]) -> Profile {
    assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip magic");
    let mut raw = Vec::new();
    GzDecoder::new(body)
        .read_to_end(&mut raw)
        .expect("valid gzip");
    Profile::decode(raw.as_slice()).expect("valid pprof protobuf")
}

fn sample_types(p: &Profile) -> Vec<(String, String)> {
    p.sample_type
        .iter()
        .map(|v| {
            (
                p.string_table[v.ty as usize].clone(),
                p.string_table[v.unit as usize].clone(),
            )
        })
        .collect()
}

fn valid_metric_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Checks one sample line `name{k="v",...} value` and returns its name.
fn parse_sample(line: &str) -> String {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let ok_value = value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value);
    assert!(ok_value, "bad value in {line:?}");
    let name = match series.split_once('{') {
        None => series,
        Some((name, rest)) => {
            let labels = rest
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                assert!(valid_metric_name(k), "bad label name {k:?} in {line:?}");
                assert!(
                    !v.trim_end_matches('"').contains('"'),
                    "unescaped quote in {line:?}"
                );
            }
            name
        }
    };
    assert!(valid_metric_name(name), "bad metric name in {line:?}");
    name.to_string()
}

#[test]
fn metrics_are_prometheus_text_with_every_name() {
    // A daemon registers its configured reverse forwards at start (0 until their first connection).
    paqet::worker::reverse::register_names(["ssh".to_owned()]);
    let srv = Server::start(Arc::new(AtomicBool::new(true)), false);
    let (status, head, body) = srv.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    let text = String::from_utf8(body).unwrap();
    let mut names = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        names.push(parse_sample(line));
    }
    for n in METRIC_NAMES {
        assert!(names.iter().any(|x| x == n), "{n} not exported:\n{text}");
    }
    for n in &names {
        assert!(
            METRIC_NAMES.contains(&n.as_str()),
            "{n} exported but not in METRIC_NAMES"
        );
    }
    assert!(
        text.contains("paqet_packets_total{direction=\"rx\"} 300\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_sessions{role=\"client\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_xdp_packets_total{counter=\"seen\"} 500\n"),
        "{text}"
    );
    // Congestion control: aggregates over both workers' sessions, the top list ranked by delivery rate.
    assert!(
        text.contains("paqet_cc_sessions{algorithm=\"bbr\",state=\"probe_bw\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_cc_delivery_rate_bytes_per_second 3000000\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_cc_sent_bytes_total 2200000\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_cc_delivered_bytes_total 2000000\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_cc_window_limited_sessions{by=\"sndwnd\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_cc_window_limited_total{by=\"sndwnd\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_cc_top_delivery_rate_bytes_per_second{rank=\"1\",peer=\"10.0.0.1:5000\"} 2000000\n"),
        "{text}"
    );
    assert!(
        text.contains("paqet_cc_top_min_rtt_seconds{rank=\"2\",peer=\"10.0.0.0:5000\"} 0.02\n"),
        "{text}"
    );
}

#[test]
fn health_readiness_and_not_found() {
    let ready = Arc::new(AtomicBool::new(false));
    let srv = Server::start(ready.clone(), false);
    assert_eq!(
        srv.get("/healthz"),
        (200, srv.get("/healthz").1, b"ok\n".to_vec())
    );
    let (status, _, body) = srv.get("/readyz");
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("no live session"),
        "{body:?}"
    );
    ready.store(true, Ordering::SeqCst);
    assert_eq!(srv.get("/readyz").0, 200);
    ready.store(false, Ordering::SeqCst);
    assert_eq!(srv.get("/readyz").0, 503);
    assert_eq!(srv.get("/nope").0, 404);
    // Profiling endpoints are absent unless enabled.
    assert_eq!(srv.get("/debug/pprof/heap").0, 404);
    assert_eq!(
        srv.request("POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0,
        405
    );
    assert_eq!(srv.request("garbage\r\n\r\n").0, 400);
    // HEAD: headers with the GET's Content-Length, no body.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(b"HEAD /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200 OK\r\n")
            && resp.contains("Content-Length: 3\r\n")
            && resp.ends_with("\r\n\r\n")
    );
}

#[test]
fn cpu_profile_is_gzipped_pprof() {
    let srv = Server::start(Arc::new(AtomicBool::new(true)), true);
    // Keep a core busy so the profile has samples to report.
    let stop = Arc::new(AtomicBool::new(false));
    let spin = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            x
        })
    };
    let (status, head, body) = srv.get("/debug/pprof/profile?seconds=1");
    stop.store(true, Ordering::Relaxed);
    spin.join().unwrap();
    assert_eq!(status, 200, "{head} {}", String::from_utf8_lossy(&body));
    let p = gunzip_profile(&body);
    // As Go's CPU profiles: samples/count and cpu/nanoseconds, period in cpu nanoseconds.
    assert_eq!(
        sample_types(&p),
        vec![
            ("samples".to_string(), "count".to_string()),
            ("cpu".to_string(), "nanoseconds".to_string())
        ]
    );
    let period = p.period_type.as_ref().expect("period type");
    assert_eq!(p.string_table[period.ty as usize], "cpu");
    assert!(p.period > 0);
    assert!(!p.sample.is_empty(), "a busy second yields samples");
    assert_eq!(srv.get("/debug/pprof/profile?seconds=0").0, 400);
    assert_eq!(srv.get("/debug/pprof/profile?seconds=x").0, 400);
}

/// (alloc_space, inuse_space) summed over the samples whose stack passes through the heap test function.
fn this_test_totals(p: &Profile) -> (i64, i64) {
    let funcs: Vec<u64> = p
        .function
        .iter()
        .filter(|f| {
            p.string_table[f.name as usize].contains("heap_profile_has_the_four_sample_types")
        })
        .map(|f| f.id)
        .collect();
    let locs: Vec<u64> = p
        .location
        .iter()
        .filter(|l| l.line.iter().any(|x| funcs.contains(&x.function_id)))
        .map(|l| l.id)
        .collect();
    p.sample
        .iter()
        .filter(|s| s.location_id.iter().any(|id| locs.contains(id)))
        .fold((0, 0), |(a, i), s| (a + s.value[1], i + s.value[3]))
}

#[test]
fn heap_profile_has_the_four_sample_types_and_live_data() {
    let srv = Server::start(Arc::new(AtomicBool::new(true)), true);
    // 64 live MiB: each 1 MiB block is sampled with probability 1 - e^-2 at the 512 KiB mean rate.
    let keep: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1 << 20]).collect();
    let (status, _, body) = srv.get("/debug/pprof/heap");
    assert_eq!(status, 200);
    let p = gunzip_profile(&body);
    let want: Vec<(String, String)> = [
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(sample_types(&p), want);
    assert!(p
        .sample
        .iter()
        .all(|s| !s.location_id.is_empty() && s.value.len() == 4));
    // Every location id a sample names exists, and functions are symbolized.
    for s in &p.sample {
        for id in &s.location_id {
            assert!(
                p.location.iter().any(|l| l.id == *id),
                "missing location {id}"
            );
        }
    }
    assert!(
        p.string_table
            .iter()
            .any(|s| s.contains("heap_profile_has_the_four_sample_types")),
        "test fn symbolized"
    );
    // Freed blocks leave the in-use figures but stay in the allocation totals. Count only the stacks through
    // this test (symbolizing the profile itself allocates and keeps a cache).
    let (alloc, inuse) = this_test_totals(&p);
    assert!(
        inuse >= 16 << 20,
        "this test's in-use estimate {inuse} for 64 MiB live"
    );
    drop(keep);
    let p2 = gunzip_profile(&srv.get("/debug/pprof/heap").2);
    let (alloc2, inuse2) = this_test_totals(&p2);
    assert!(
        inuse2 + (16 << 20) <= inuse,
        "in-use {inuse} -> {inuse2} after freeing 64 MiB"
    );
    assert!(
        alloc2 >= alloc,
        "allocation totals never shrink: {alloc} -> {alloc2}"
    );
}

/// A client and a server worker joined by the in-memory packet backend, each publishing into its own
/// hub like the daemon does; the client's `/metrics` is served by the ops server and scraped over HTTP
/// after 1 MiB went through the tunnel: the congestion-control families describe the live session.
#[test]
fn daemon_pair_exports_congestion_control_figures() {
    use paqet::io::{mem, PacketIo};
    use paqet::ops::MetricsHub;
    use paqet::proto::kcp::{KcpConfig, KcpMode};
    use paqet::proto::session::{Role, SessionConfig};
    use paqet::proto::smux::SmuxConfig;
    use paqet::wire::crypt::{BlockMode, Crypto};
    use paqet::wire::envelope::TcpFlags;
    use paqet::worker::{self, FamilyConfig, IoFactory, Limits, WorkerConfig};
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CLIENT: &str = "10.9.0.1:40000";
    const SERVER: &str = "10.9.0.2:9999";
    let cfg = |role: Role| {
        let (me, mac, peer_mac) = match role {
            Role::Client => (CLIENT, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
            Role::Server => (SERVER, [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]),
        };
        WorkerConfig {
            role,
            session: SessionConfig {
                crypto: Crypto::from_derived(BlockMode::Aes, &[0x42; 32]).expect("crypto"),
                dshard: 0,
                pshard: 0,
                kcp: KcpConfig::preset(KcpMode::Fast3),
                smux: SmuxConfig::default(),
                mtu: 1350,
            },
            local_mac: mac,
            ipv4: Some(FamilyConfig {
                addr: me.parse().unwrap(),
                router_mac: peer_mac,
            }),
            ipv6: None,
            server_addr: (role == Role::Client).then(|| SERVER.parse().unwrap()),
            servers: Vec::new(),
            conn: 1,
            local_flags: vec![TcpFlags::PSH_ACK],
            remote_flags: vec![TcpFlags::ACK],
            guard: None,
            probe_response: Default::default(),
            limits: Limits::default(),
            header_timeout: Duration::from_secs(10),
            rotate: Default::default(),
            reverse: Default::default(),
            targets: Default::default(),
            replay: None,
            noise: None,
        }
    };
    let once = |io: mem::MemIo| -> IoFactory {
        let mut slot = Some(io);
        Box::new(move |_port| {
            slot.take()
                .map(|io| Box::new(io) as Box<dyn PacketIo>)
                .ok_or_else(|| std::io::Error::other("test backend already used"))
        })
    };
    let hub = MetricsHub::new(RoleLabel::Client, DataPathMode::Pcap, 1);
    hub.set_attached(true);
    let server_hub = MetricsHub::new(RoleLabel::Server, DataPathMode::Pcap, 1);
    let state = Arc::new(hub.ops_state());
    let (addr, thread) =
        spawn_ops_thread("127.0.0.1:0".parse().unwrap(), state.clone()).expect("ops server");
    let srv = Server {
        addr,
        state,
        thread: Some(thread),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let text = local.block_on(&rt, async {
        let (a, b) = mem::pair(4096);
        let server = worker::start(cfg(Role::Server), once(b)).expect("server start");
        let client = worker::start(cfg(Role::Client), once(a)).expect("client start");
        tokio::task::spawn_local(worker::setup::publish_metrics(
            server.shared.clone(),
            server_hub.clone(),
            0,
        ));
        tokio::task::spawn_local(worker::setup::publish_metrics(
            client.shared.clone(),
            hub.clone(),
            0,
        ));
        let tunnel = client.tunnel.expect("client tunnel");
        // An echo target: 1 MiB goes up and comes back.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo = l.local_addr().unwrap();
        tokio::task::spawn_local(async move {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            let (mut r, mut w) = c.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let s = tunnel
            .open_tcp("127.0.0.1", echo.port())
            .await
            .expect("open_tcp");
        let (mut r, mut w) = tokio::io::split(s);
        let data: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
        let n = data.len();
        let writer = async move {
            w.write_all(&data).await.expect("tunnel write");
            w
        };
        let reader = async move {
            let mut got = vec![0u8; n];
            r.read_exact(&mut got).await.expect("tunnel read");
            got
        };
        let (_w, got) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(writer, reader)
        })
        .await
        .expect("echo within 60 s");
        assert_eq!(got.len(), n);
        // Scrape until the publisher carried the figures gathered after the transfer (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _, body) = srv.get("/metrics");
            assert_eq!(status, 200);
            let text = String::from_utf8(body).unwrap();
            let sent = text
                .lines()
                .find_map(|l| l.strip_prefix("paqet_cc_sent_bytes_total "))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if sent >= n as f64 {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "paqet_cc_sent_bytes_total stays below {n}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    drop(srv);
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let value = |prefix: &str| -> Vec<f64> {
        samples
            .iter()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .collect()
    };
    assert_eq!(
        value("paqet_cc_sessions{").iter().sum::<f64>(),
        1.0,
        "one live session:\n{text}"
    );
    assert_eq!(
        value("paqet_cc_window_limited_sessions{").len(),
        2,
        "{text}"
    );
    assert_eq!(value("paqet_cc_srtt_seconds{").len(), 3, "{text}");
    // The only session is rank 1 of the top list, labelled with its peer (the server).
    for family in [
        "delivery_rate_bytes_per_second",
        "srtt_seconds",
        "retrans_ratio",
        "inflight_bytes",
    ] {
        let series = format!("paqet_cc_top_{family}{{rank=\"1\",peer=\"{SERVER}\"}} ");
        assert!(text.contains(&series), "{series} missing:\n{text}");
    }
    assert!(!text.contains("rank=\"2\""), "{text}");
    for s in &samples {
        parse_sample(s);
    }
}
