//! End to end through the real `paqet-dp` binary (root only; skipped otherwise): curl through the SOCKS5
//! and HTTP proxy front ends (200 MiB each way, 16 parallel downloads, all sha256-checked), UDP through
//! SOCKS5 UDP ASSOCIATE and a UDP forward, the health endpoints, the dashboard's metric names against a
//! live scrape, and `config import` of the spec's example configs run as the two daemons.
//!
//! Every test runs for each `(server mode, client mode)` pair of `common::MODES`.
mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn curl_through_socks5_and_http_proxy() {
    if skip(
        "curl_through_socks5_and_http_proxy",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let t = Tunnel::start("tcu", Opts::new(modes));
        let ns = t.net.client();

        // Small requests through both proxies.
        let f = fetch(ns, t.socks(), &t.url("/ping"), 20);
        assert!(f.ok && f.len == 4, "GET /ping via SOCKS5: {f:?}");
        let f = fetch(ns, t.http_proxy(), &t.url("/ping"), 20);
        assert!(f.ok && f.len == 4, "GET /ping via the HTTP proxy: {f:?}");

        // 200 MiB down through SOCKS5 (socks5h), 200 MiB up through the HTTP proxy.
        let len = 200 * MIB;
        report(
            "download via socks5h",
            len,
            t.download_checked(t.socks(), 1, len, 240),
        );
        report(
            "upload via HTTP proxy",
            len,
            t.upload_checked(t.http_proxy(), 2, len, 240),
        );
        // And the other pairing, smaller.
        t.download_checked(t.http_proxy(), 3, 8 * MIB, 60);
        t.upload_checked(t.socks(), 4, 8 * MIB, 60);

        // 16 parallel downloads of 8 MiB (half through each proxy), all sha256-checked.
        let each = 8 * MIB;
        let t0 = std::time::Instant::now();
        let jobs: Vec<_> = (0..16u64)
            .map(|i| {
                let via = if i % 2 == 0 {
                    t.socks()
                } else {
                    t.http_proxy()
                };
                let mut c = curl_cmd(ns, via, 180);
                c.arg(t.url(&format!("/gen/{}/{each}", 100 + i)));
                (i, via, spawn_fetch(c))
            })
            .collect();
        for (i, via, j) in jobs {
            let f = j.join().expect("fetch thread");
            assert!(
                f.ok,
                "parallel download {i} via {via:?} failed after {} bytes: {}",
                f.len, f.stderr
            );
            assert_eq!(f.len, each, "parallel download {i}: length");
            assert_eq!(
                f.sha256,
                pattern_sha256(100 + i, each),
                "parallel download {i}: sha256"
            );
        }
        report("16 parallel downloads", 16 * each, t0.elapsed());
        let mut t = t;
        t.server.assert_running();
        t.client.assert_running();
    }
}

#[test]
fn udp_through_socks5_associate_and_forward() {
    if skip(
        "udp_through_socks5_associate_and_forward",
        &["iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let t = Tunnel::start("tud", Opts::new(modes));
        for i in 0..3u32 {
            let msg = format!("socks5-udp-request-{i}").into_bytes();
            let got = socks5_udp_roundtrip(
                t.net.client(),
                ClientPorts::MAIN.socks,
                t.udp.addr,
                &msg,
                Duration::from_secs(15),
            )
            .unwrap_or_else(|e| panic!("SOCKS5 UDP ASSOCIATE round trip {i}: {e}"));
            assert_eq!(got, msg, "SOCKS5 UDP reply {i}");
        }
        // A larger datagram (still under the SOCKS5 front end's 4096-byte limit).
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let got = socks5_udp_roundtrip(
            t.net.client(),
            ClientPorts::MAIN.socks,
            t.udp.addr,
            &big,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("SOCKS5 UDP 3000-byte round trip: {e}"));
        assert_eq!(got, big, "SOCKS5 UDP 3000-byte reply");
        for i in 0..3u32 {
            let msg = format!("udp-forward-request-{i}").into_bytes();
            let got = udp_forward_roundtrip(
                t.net.client(),
                ClientPorts::MAIN.fwd_udp,
                &msg,
                Duration::from_secs(15),
            )
            .unwrap_or_else(|e| panic!("UDP forward round trip {i}: {e}"));
            assert_eq!(got, msg, "UDP forward reply {i}");
        }
    }
}

/// A second client on the same interface as the main one (in pcap mode next to an XDP client: one XDP
/// daemon per interface) works at the same time as the main client: an XDP client steers only frames to
/// its own session ports, so the server's frames to the other client still reach the kernel and pcap.
#[test]
fn two_clients_on_one_interface_work_at_once() {
    if skip(
        "two_clients_on_one_interface_work_at_once",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!(
            "== modes {modes:?} (second client in {:?} mode)",
            modes.1.beside()
        );
        let t = Tunnel::start("t2c", Opts::new(modes));
        let mut second = t.spawn_client("client-second", ClientPorts::SECOND, KEY);
        let up = poll(READY_WITHIN, || {
            second.assert_running();
            t.probe(ClientPorts::SECOND.fwd_http).ok()
        });
        if up.is_none() {
            panic!(
                "the second client never carried a request: {:?}\n--- second client ---\n{}\n--- main client ---\n{}",
                t.probe(ClientPorts::SECOND.fwd_http),
                second.log_text(),
                t.client.log_text()
            );
        }
        // Both carry data at once, byte-exact.
        let len = 16 * MIB;
        let jobs: Vec<_> = [
            (ClientPorts::MAIN.socks, 11u64),
            (ClientPorts::SECOND.socks, 12u64),
        ]
        .into_iter()
        .map(|(port, seed)| {
            let mut c = curl_cmd(t.net.client(), Via::Socks5(port), 120);
            c.arg(t.url(&format!("/gen/{seed}/{len}")));
            (port, seed, spawn_fetch(c))
        })
        .collect();
        for (port, seed, j) in jobs {
            let f = j.join().expect("fetch thread");
            assert!(
                f.ok && f.len == len,
                "download through the client on SOCKS5 port {port}: {f:?}"
            );
            assert_eq!(
                f.sha256,
                pattern_sha256(seed, len),
                "download through the client on SOCKS5 port {port}: sha256"
            );
        }
        // And the main client still works after the second one stops.
        second.stop();
        t.download_checked(t.socks(), 13, MIB, 30);
        let mut t = t;
        t.client.assert_running();
        t.server.assert_running();
    }
}

#[test]
fn health_endpoints_follow_the_server() {
    if skip(
        "health_endpoints_follow_the_server",
        &["iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let mut t = Tunnel::start("the", Opts::new(modes));
        let c = t.net.client();
        let s = t.net.server();
        assert_eq!(
            http_get(c, METRICS_PORT, "/healthz").map(|r| r.0),
            Ok(200),
            "client /healthz"
        );
        assert_eq!(
            http_get(s, METRICS_PORT, "/healthz").map(|r| r.0),
            Ok(200),
            "server /healthz"
        );
        assert_eq!(
            http_get(s, METRICS_PORT, "/readyz").map(|r| r.0),
            Ok(200),
            "server /readyz"
        );
        // The tunnel carried a request, so the client has a live session: ready (bounded, the session
        // count is read on scrape).
        let ready = poll(Duration::from_secs(10), || {
            (http_get(c, METRICS_PORT, "/readyz").ok()?.0 == 200).then_some(())
        });
        assert!(
            ready.is_some(),
            "client /readyz never 200: {:?}",
            http_get(c, METRICS_PORT, "/readyz")
        );

        // Server gone: the client's sessions die by the smux keepalive timeout and it turns unready.
        t.server.kill();
        let within = Duration::from_secs(u64::from(t.opts.smuxktimeout) + 10);
        let unready = poll(within, || {
            let (st, body) = http_get(c, METRICS_PORT, "/readyz").ok()?;
            (st == 503).then_some(body)
        });
        match unready {
            Some(body) => eprintln!("client /readyz 503 after the server died: {}", body.trim()),
            None => panic!(
                "client /readyz still {:?} {within:?} after the server died",
                http_get(c, METRICS_PORT, "/readyz")
            ),
        }
        // And it stays unready while the server is gone (re-dialled sessions that never hear from the
        // server are not live): sampled across more than two keepalive intervals.
        for i in 0..(4 * t.opts.smuxkalive) {
            std::thread::sleep(Duration::from_millis(500));
            let r = http_get(c, METRICS_PORT, "/readyz");
            assert!(
                matches!(r, Ok((503, _))),
                "client /readyz flipped back to {r:?} (sample {i}) with the server still dead"
            );
        }
        assert_eq!(
            http_get(c, METRICS_PORT, "/healthz").map(|r| r.0),
            Ok(200),
            "client /healthz stays 200 (alive)"
        );
        t.client.assert_running();
    }
}

/// Family names of the `paqet_…` metrics a dashboard expression queries.
fn dashboard_metric_names() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/paqet-dp-dashboard.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON: {e}"));
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(!exprs.is_empty(), "{path}: no expressions");
    let mut names: Vec<String> = Vec::new();
    for e in &exprs {
        let b = e.as_bytes();
        let mut i = 0;
        while let Some(p) = e[i..].find("paqet_") {
            let start = i + p;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            let preceded_ok =
                start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
            if preceded_ok {
                names.push(e[start..end].to_owned());
            }
            i = end;
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Whether a scrape exports metric `name` (a sample name, or its family with `_total`/`_bucket`/`_sum`/
/// `_count` suffixes, whose `# TYPE` line is present even before its first sample).
fn exported(scrape: &str, name: &str) -> bool {
    let family = ["_bucket", "_count", "_sum", "_total"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    scrape.lines().any(|l| {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let n = rest.split_whitespace().next().unwrap_or("");
            return n == family || n == name;
        }
        !l.starts_with('#')
            && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
    })
}

#[test]
fn dashboard_metrics_are_exported() {
    let names = dashboard_metric_names();
    assert!(
        names.len() >= 5,
        "too few metric names in the dashboard: {names:?}"
    );
    if skip("dashboard_metrics_are_exported", &["iptables", "ethtool"]) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let t = Tunnel::start("tda", Opts::new(modes));
        // Some traffic so per-session series exist.
        t.download_checked(t.socks(), 9, MIB, 30);
        let scrapes = scrape(t.net.client()) + &scrape(t.net.server());
        // The XDP / AF_XDP families only exist while a side runs an XDP data path; with none, they must at
        // least be in the daemon's declared export list (whose encoding the metrics unit tests check).
        let xdp_running = modes.0 != Mode::Pcap || modes.1 != Mode::Pcap;
        let xdp_only = |n: &str| n.starts_with("paqet_xdp_") || n.starts_with("paqet_afxdp_");
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| {
                if !xdp_running && xdp_only(n) {
                    !paqet::ops::METRIC_NAMES.contains(&n.as_str())
                } else {
                    !exported(&scrapes, n)
                }
            })
            .collect();
        assert!(missing.is_empty(), "dashboard metrics not exported by the daemons: {missing:?}\n--- scrapes ---\n{scrapes}");
    }
}

/// The spec's §2.3 client example (YAML), adapted to the test topology.
fn client_yaml(net: &Net, http: &HttpServer, udp: &UdpEcho) -> String {
    format!(
        r#"role: "client"
log: {{ level: "info" }}
socks5:
  - listen: "127.0.0.1:{socks}"
    username: ""            # both empty = no auth
    password: ""
forward:
  - {{ listen: "127.0.0.1:{fwd_http}", target: "{http_addr}", protocol: "tcp" }}
  - {{ listen: "127.0.0.1:{fwd_udp}", target: "{udp_addr}",  protocol: "udp" }}
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
    dshard: 0
    pshard: 0
    block: "aes"
    key: "{KEY}"
    smuxbuf: 4194304
    streambuf: 2097152
    smuxkalive: 2
    smuxktimeout: 8
"#,
        socks = ClientPorts::MAIN.socks,
        fwd_http = ClientPorts::MAIN.fwd_http,
        fwd_udp = ClientPorts::MAIN.fwd_udp,
        http_addr = http.addr,
        udp_addr = udp.addr,
        cif = net.client_if,
        cip = net.client_ip,
        cgw = net.client_gw_mac,
        sip = net.server_ip,
    )
}

/// The spec's §2.4 server example (YAML), adapted to the test topology.
fn server_yaml(net: &Net) -> String {
    format!(
        r#"role: "server"
log: {{ level: "info" }}
listen: {{ addr: ":{TUNNEL_PORT}" }}            # cosmetic; port must equal network.ipv4.addr port
network:
  interface: "{sif}"
  ipv4: {{ addr: "{sip}:{TUNNEL_PORT}", router_mac: "{sgw}" }}
  tcp:  {{ local_flag: ["PA"] }}      # used only for clients that sent no PTCPF
  pcap: {{ sockbuf: 8388608 }}
transport:
  protocol: "kcp"
  kcp: {{ mode: "fast", mtu: 1350, rcvwnd: 1024, sndwnd: 1024, block: "aes",
         key: "{KEY}", smuxbuf: 4194304, streambuf: 2097152,
         smuxkalive: 2, smuxktimeout: 8 }}
"#,
        sif = net.server_if,
        sip = net.server_ip,
        sgw = net.server_gw_mac,
    )
}

/// `paqet-dp config import FILE` → the TOML it prints (panics with stderr on failure).
fn import(dir: &std::path::Path, name: &str, yaml: &str) -> String {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(bin())
        .args(["config", "import"])
        .arg(&path)
        .output()
        .expect("run config import");
    assert!(
        out.status.success(),
        "config import {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8(out.stdout).expect("UTF-8 TOML");
    // The imported TOML passes `config check` too.
    let tpath = dir.join(format!("{name}-imported.toml"));
    std::fs::write(&tpath, &toml).unwrap();
    let chk = std::process::Command::new(bin())
        .args(["config", "check"])
        .arg(&tpath)
        .output()
        .expect("run config check");
    assert!(
        chk.status.success(),
        "config check of imported {name}: {}\n{toml}",
        String::from_utf8_lossy(&chk.stderr)
    );
    toml
}

#[test]
fn imported_spec_examples_run_and_move_data() {
    if skip(
        "imported_spec_examples_run_and_move_data",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for &modes in MODES {
        eprintln!("== modes {modes:?}");
        let make = |net: &Net, http: &HttpServer, udp: &UdpEcho, dir: &std::path::Path| {
            let server = import(dir, "server-spec", &server_yaml(net));
            let client = import(dir, "client-spec", &client_yaml(net, http, udp));
            assert!(
                server.contains("guard = false") && client.contains("guard = false"),
                "imported configs keep the guard off"
            );
            (server, client)
        };
        let t = Tunnel::start_with("tim", Opts::new(modes), Some(&make));
        t.download_checked(Via::Socks5(ClientPorts::MAIN.socks), 21, 16 * MIB, 120);
        t.upload_checked(Via::Socks5(ClientPorts::MAIN.socks), 22, 4 * MIB, 60);
        let got = udp_forward_roundtrip(
            t.net.client(),
            ClientPorts::MAIN.fwd_udp,
            b"imported-udp",
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("UDP forward of the imported config: {e}"));
        assert_eq!(got, b"imported-udp");
    }
}
