//! The authenticated noise wire (`transport.kcp.block = "noise"`) end to end through the real `paqet-dp`
//! binary (root only; skipped otherwise): keys made by `paqet-dp keygen` (the server's in a 0600 file, the
//! client's inline), SOCKS5 TCP with a sha256-checked bulk download and upload, SOCKS5 UDP ASSOCIATE and a
//! UDP forward, a server restart the client recovers from, in pcap mode and generic XDP mode; a lossy,
//! reordering link (with a pre-shared key); and the two ways an ordinary (kcp-go-framed) peer meets a noise peer: the noise
//! server sends nothing back and logs why, the noise client warns that its initiations go unanswered.
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::{self, answers_to, mutated, record, Sniffer};
use common::*;
use paqet_testkit::impair::LinkSpec;

const MIB: u64 = 1 << 20;

/// Keys of one server and one client, as `paqet-dp keygen` makes them.
struct Keys {
    server_key_file: String,
    server_public: String,
    client_private: String,
    client_public: String,
}

fn keygen(dir: &Path) -> Keys {
    let file = dir.join("server-noise.key");
    let out = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(&file)
        .output()
        .expect("run paqet-dp keygen --out");
    assert!(out.status.success(), "keygen --out: {out:?}");
    let server_public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mode = std::fs::metadata(&file).expect("key file").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "keygen --out writes the private key 0600"
    );
    let out = Command::new(bin())
        .arg("keygen")
        .output()
        .expect("run paqet-dp keygen");
    assert!(out.status.success(), "keygen: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("keygen output without {name}: {text}"))
            .trim()
            .to_owned()
    };
    Keys {
        server_key_file: file.to_string_lossy().into_owned(),
        server_public,
        client_private: field("private_key:"),
        client_public: field("public_key:"),
    }
}

/// Turns one of the common configs (`block = "aes"` + the shared key) into a noise one with `section`
/// as its `[transport.noise]` table.
fn noise_config(cfg: &str, key: &str, section: &str) -> String {
    let kcp = format!("block = \"aes\"\nkey = \"{key}\"\n");
    assert!(
        cfg.contains(&kcp),
        "config without the expected block/key lines"
    );
    format!(
        "{}\n[transport.noise]\n{section}\n",
        cfg.replace(&kcp, "block = \"noise\"\n")
    )
}

fn server_section(k: &Keys) -> String {
    format!(
        "private_key = \"{}\"\nclient_public_keys = [\"{}\"]",
        k.server_key_file, k.client_public
    )
}

fn client_section(k: &Keys) -> String {
    format!(
        "private_key = \"{}\"\nserver_public_key = \"{}\"",
        k.client_private, k.server_public
    )
}

/// A tunnel whose two daemons speak the noise wire (guard on, as the TOML default); with `psk`, both ends
/// also share a pre-shared key file made by `paqet-dp keygen --psk --out` (the handshake is IKpsk2).
fn noise_tunnel(tag: &str, o: Opts, psk: bool) -> Tunnel {
    noise_tunnel_with(tag, o, psk, &|_| {}, &|cfg| cfg)
}

/// [`noise_tunnel`] with `before` run once the namespaces exist (before the daemons start) and `edit`
/// applied to both daemons' configs.
fn noise_tunnel_with(
    tag: &str,
    o: Opts,
    psk: bool,
    before: &dyn Fn(&Net),
    edit: &dyn Fn(String) -> String,
) -> Tunnel {
    let configs = |net: &Net, http: &HttpServer, udp: &UdpEcho, dir: &Path| {
        before(net);
        let k = keygen(dir);
        let psk_line = if psk {
            let file = dir.join("noise.psk");
            let out = Command::new(bin())
                .args(["keygen", "--psk", "--out"])
                .arg(&file)
                .output()
                .expect("run paqet-dp keygen --psk");
            assert!(out.status.success(), "keygen --psk: {out:?}");
            format!("\npsk = \"{}\"", file.display())
        } else {
            String::new()
        };
        let s = Tunnel::server_config(net, &o);
        let c = Tunnel::client_config(net, &o, http, udp, ClientPorts::MAIN, &o.client_key);
        (
            edit(noise_config(
                &s,
                &o.server_key,
                &(server_section(&k) + &psk_line),
            )),
            edit(noise_config(
                &c,
                &o.client_key,
                &(client_section(&k) + &psk_line),
            )),
        )
    };
    Tunnel::start_with(tag, o.clone(), Some(&configs))
}

fn no_foreign_drops_logged(t: &Tunnel) -> bool {
    !t.server.log_text().contains("dropping non-noise packets")
}

#[test]
fn noise_tunnel_carries_tcp_and_udp_and_survives_a_server_restart() {
    if skip(
        "noise_tunnel_carries_tcp_and_udp_and_survives_a_server_restart",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    for (modes, bulk) in [
        ((Mode::Pcap, Mode::Pcap), 200 * MIB),
        ((Mode::XdpGeneric, Mode::XdpGeneric), 200 * MIB),
    ] {
        eprintln!("== modes {modes:?}");
        let mut t = noise_tunnel("nzt", Opts::new(modes), false);
        let ns = t.net.client();
        let f = fetch(ns, t.socks(), &t.url("/ping"), 20);
        assert!(f.ok && f.len == 4, "GET /ping via SOCKS5: {f:?}");
        report(
            "noise: download via socks5h",
            bulk,
            t.download_checked(t.socks(), 61, bulk, 240),
        );
        report(
            "noise: upload via HTTP proxy",
            16 * MIB,
            t.upload_checked(t.http_proxy(), 62, 16 * MIB, 120),
        );
        for i in 0..3u32 {
            let msg = format!("noise-udp-{i}").into_bytes();
            let got = socks5_udp_roundtrip(
                ns,
                ClientPorts::MAIN.socks,
                t.udp.addr,
                &msg,
                Duration::from_secs(15),
            )
            .unwrap_or_else(|e| panic!("SOCKS5 UDP round trip {i}: {e}"));
            assert_eq!(got, msg);
        }
        let got = udp_forward_roundtrip(
            ns,
            ClientPorts::MAIN.fwd_udp,
            b"noise-forward",
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("UDP forward round trip: {e}"));
        assert_eq!(got, b"noise-forward");
        assert!(no_foreign_drops_logged(&t), "{}", t.server.log_text());

        // The server restarts with no memory of the sessions: the client's keys open nothing there, it
        // notices (smux keepalive, no reply for 15 s) and handshakes again on its own.
        t.restart_server("server-restarted");
        let t0 = Instant::now();
        let back = poll(Duration::from_secs(60), || {
            t.probe(ClientPorts::MAIN.fwd_http).ok()
        });
        assert!(
            back.is_some(),
            "no request went through within 60 s of the server restart\n--- client ---\n{}",
            t.client.log_text()
        );
        eprintln!(
            "noise client recovered {:.1} s after the restart",
            t0.elapsed().as_secs_f64()
        );
        t.download_checked(t.socks(), 63, 8 * MIB, 60);
        t.client.assert_running();
        t.server.assert_running();
    }
}

#[test]
fn noise_tunnel_over_a_lossy_reordering_link() {
    if skip(
        "noise_tunnel_over_a_lossy_reordering_link",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    if !std::path::Path::new("/proc/net/netfilter/nfnetlink_queue").exists() {
        eprintln!("skipped: kernel has no nfnetlink_queue (needed for the impaired link)");
        return;
    }
    let _serial = serial();
    for (modes, tag) in [
        ((Mode::Pcap, Mode::Pcap), "nzl"),
        ((Mode::XdpGeneric, Mode::XdpGeneric), "nzx"),
    ] {
        eprintln!("== modes {modes:?}");
        let mut o = Opts::new(modes);
        // 20 ms ± 5 ms per direction (reordering), 2 % loss per direction.
        o.link = Some(LinkSpec {
            delay_ms: 20,
            jitter_ms: 5,
            loss_pct: 2.0,
            dup_pct: 0.0,
            seed: 11,
        });
        o.wnd = 2048;
        o.smuxktimeout = 10;
        // With a pre-shared key (IKpsk2) on both ends.
        let mut t = noise_tunnel(tag, o, true);
        report(
            "noise: 32 MiB down over the impaired link",
            32 * MIB,
            t.download_checked(t.socks(), 71, 32 * MIB, 180),
        );
        t.upload_checked(t.socks(), 72, 8 * MIB, 120);
        t.server.assert_running();
        t.client.assert_running();
    }
}

/// The common server/client configs with the guard off (as an upstream peer, or an imported YAML, has it).
fn without_guard(cfg: &str) -> String {
    cfg.replace("[transport.kcp]\n", "[transport.kcp]\nguard = false\n")
}

#[test]
fn ordinary_and_noise_peers_refuse_each_other_and_say_why() {
    if skip(
        "ordinary_and_noise_peers_refuse_each_other_and_say_why",
        &["iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    let o = Opts::new((Mode::Pcap, Mode::Pcap));
    let net = Net::direct("nzu");
    let dir = TempDir::new("nzu");
    let http = HttpServer::start(net.server());
    let udp = UdpEcho::start(net.server());
    let manage = run_supports("--manage-firewall");
    if !manage {
        net.apply_firewall(true, true);
    }
    let k = keygen(dir.path());

    // 1. An ordinary kcp-go-framed client (aes, guard off: upstream's wire) meets a noise server.
    let scfg = noise_config(
        &without_guard(&Tunnel::server_config(&net, &o)),
        &o.server_key,
        &server_section(&k),
    );
    let ccfg = without_guard(&Tunnel::client_config(
        &net,
        &o,
        &http,
        &udp,
        ClientPorts::MAIN,
        &o.client_key,
    ));
    let mut server = Daemon::spawn(
        net.server(),
        dir.path(),
        "server",
        &scfg,
        Mode::Pcap,
        manage,
    );
    let mut client = Daemon::spawn(
        net.client(),
        dir.path(),
        "client",
        &ccfg,
        Mode::Pcap,
        manage,
    );
    let logged = poll(Duration::from_secs(20), || {
        server.assert_running();
        client.assert_running();
        // Keep the client sending (each attempt opens streams, so KCP transmits).
        let _ = fetch(
            net.client(),
            Via::Socks5(ClientPorts::MAIN.socks),
            &http.url("/ping"),
            2,
        );
        server
            .log_text()
            .contains("noise: dropping non-noise packets from")
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "the noise server never said why it drops the ordinary client's packets\n{}",
        server.log_text()
    );
    let s = scrape(net.server());
    let dropped = metric_sum(&s, "paqet_crypto_failures_total");
    assert!(
        dropped > 0.0,
        "no paqet_crypto_failures_total{{reason=\"noise_…\"}} counted:\n{s}"
    );
    assert!(s.contains("reason=\"noise_"), "{s}");
    let tx = series_sum(&s, "paqet_packets_total{direction=\"tx\"}");
    assert_eq!(
        tx, 0.0,
        "the noise server sent {tx} frames to a client that never completed a handshake"
    );
    let lines = server
        .log_text()
        .lines()
        .filter(|l| l.contains("dropping non-noise packets"))
        .count();
    assert_eq!(
        lines, 1,
        "the drop is logged once a minute per source, not per packet"
    );
    eprintln!(
        "ordinary client vs noise server: {dropped} drops, {tx} frames sent back, 1 log line"
    );
    client.stop();
    server.stop();

    // 2. A noise client meets an ordinary server: no answer ever comes, and the client says so.
    let scfg = without_guard(&Tunnel::server_config(&net, &o));
    let ccfg = noise_config(
        &without_guard(&Tunnel::client_config(
            &net,
            &o,
            &http,
            &udp,
            ClientPorts::MAIN,
            &o.client_key,
        )),
        &o.client_key,
        &client_section(&k),
    );
    let mut server = Daemon::spawn(
        net.server(),
        dir.path(),
        "server2",
        &scfg,
        Mode::Pcap,
        manage,
    );
    let mut client = Daemon::spawn(
        net.client(),
        dir.path(),
        "client2",
        &ccfg,
        Mode::Pcap,
        manage,
    );
    let warned = poll(Duration::from_secs(30), || {
        server.assert_running();
        client.assert_running();
        client
            .log_text()
            .contains("noise: no handshake response from")
            .then_some(())
    });
    assert!(
        warned.is_some(),
        "the noise client never warned about unanswered initiations\n{}",
        client.log_text()
    );
    let s = scrape(net.server());
    assert_eq!(
        metric_sum(&s, "paqet_session_opens_total"),
        0.0,
        "the ordinary server opened a session from noise packets"
    );
    let f = fetch(
        net.client(),
        Via::Socks5(ClientPorts::MAIN.socks),
        &http.url("/ping"),
        3,
    );
    assert!(
        !f.ok,
        "a request passed between a noise client and an ordinary server"
    );
    client.stop();
    server.stop();
}

/// The prober's address (on the client's link; nothing configures it, frames are injected raw).
const PROBER: Ipv4Addr = Ipv4Addr::new(10, 216, 0, 77);

/// An active prober against a noise server (pcap mode, guard off on both ends so that every probe meets
/// the noise layer itself): the client's recorded datagrams (its handshake initiation and transport
/// messages) replayed unchanged from the client's own address and from another address, the first one
/// alone from another address, flipped bytes and garbage. The server sends the prober nothing, counts the
/// drops, and the live client keeps working.
#[test]
fn noise_server_answers_no_replay_flip_or_garbage() {
    if skip(
        "noise_server_answers_no_replay_flip_or_garbage",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let slot: Arc<Mutex<Option<Sniffer>>> = Arc::default();
    let sn = slot.clone();
    let mut o = Opts::new((Mode::Pcap, Mode::Pcap));
    o.conn = 1;
    let t = noise_tunnel_with(
        "nzp",
        o,
        false,
        &move |net: &Net| *sn.lock().unwrap() = Some(Sniffer::start(net.client(), &net.client_if)),
        &|cfg| without_guard(&cfg),
    );
    let sniff = slot.lock().unwrap().take().expect("sniffer started");
    let recorded = record(&t, sniff);
    let lens: Vec<usize> = recorded
        .iter()
        .filter_map(|f| raw::parse4(f).map(|p| p.payload_len))
        .collect();
    assert!(
        lens.contains(&141),
        "the recording holds the handshake initiation (141 bytes): {lens:?}"
    );
    let drops = |t: &Tunnel| metric_sum(&scrape(t.net.server()), "paqet_crypto_failures_total");
    let d0 = drops(&t);

    let watch = Sniffer::start(t.net.client(), &t.net.client_if);
    let prober = |port: u16| SocketAddr::from((PROBER, port));
    let own = SocketAddr::from((t.net.client_ip, 41001));
    let mut probes: Vec<Vec<u8>> = vec![raw::resourced(&recorded[0], prober(41000))];
    probes.extend(recorded.iter().map(|f| raw::resourced(f, prober(41002))));
    // Unchanged, from the client's own address and port: the replay window and the handshake's
    // timestamp refuse them.
    probes.extend(recorded.iter().cloned());
    probes.extend(mutated(&recorded, prober(41003), |p| {
        let i = p.len() / 2;
        p[i] ^= 0x40
    }));
    probes.extend(mutated(&recorded[..1], own, |p| p[p.len() - 1] ^= 0x01));
    probes.extend(mutated(&recorded[..1], prober(41004), |p| p.fill(0x5a)));
    let sent = probes.len();
    raw::inject(
        t.net.client(),
        &t.net.client_if,
        probes,
        Duration::from_millis(2),
    );
    let counted = poll(Duration::from_secs(6), || {
        let d = drops(&t);
        (d >= d0 + (sent - recorded.len()) as f64 / 2.0).then_some(d)
    });
    std::thread::sleep(Duration::from_millis(300));
    let to_prober = answers_to(&watch, t.net.server_ip, PROBER);
    assert!(
        to_prober.is_empty(),
        "the noise server answered the prober {} times",
        to_prober.len()
    );
    let d = counted.unwrap_or_else(|| drops(&t));
    assert!(
        d > d0,
        "the server counted none of the {sent} probes as noise drops"
    );
    assert!(
        t.probe(ClientPorts::MAIN.fwd_http).is_ok(),
        "the live client keeps working"
    );
    eprintln!(
        "noise prober: {} recorded datagrams ({lens:?} bytes); {sent} probes, 0 answers, {} counted as noise drops, {:.1} s",
        recorded.len(),
        d - d0,
        t0.elapsed().as_secs_f64()
    );
}
