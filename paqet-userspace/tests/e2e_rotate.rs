//! Client session rotation (`transport.rotate`, issue 12 item 3): a 200 MiB download through SOCKS5 crosses
//! a rotation (`bytes = 32 MiB`; sha256 checked); then, with `after = 2`, the client replaces its one session
//! every ~2 s (a new conv from a new source port) while a paced echo transfer runs and 100 idle streams stay
//! open; the transfer's bytes come back intact (sha256) in both directions, the idle streams keep working on
//! the draining session, new streams work on the new one, and every rotated-out session is closed once its
//! streams have ended. Pcap and XDP generic mode. Root only; every wait is bounded.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Bytes of the paced transfer and its pacing: 128 chunks of 64 KiB, one every 40 ms (over 5 s: two
/// rotations or more).
const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 128;
const PACE: Duration = Duration::from_millis(40);
/// Idle streams held across the rotations.
const IDLE: usize = 100;

fn echo_once(c: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    c.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    (got == msg)
        .then_some(())
        .ok_or_else(|| "echo differs".into())
}

fn rotation(tag: &str, modes: (Mode, Mode)) {
    let mut opts = Opts::new(modes);
    opts.conn = 1;
    opts.smuxkalive = 1;
    opts.smuxktimeout = 4;
    let o = opts.clone();
    let make = |net: &Net, http: &HttpServer, udp: &UdpEcho, _dir: &std::path::Path| {
        let client = Tunnel::client_config(net, &o, http, udp, ClientPorts::MAIN, KEY).replace(
            "[transport.kcp]",
            "[transport.rotate]\nafter = 2\nbytes = 33554432\ndrain = 60\n[transport.kcp]",
        );
        assert!(client.contains("[transport.rotate]"));
        (Tunnel::server_config(net, &o), client)
    };
    let t = Tunnel::start_with(tag, opts, Some(&make));
    let echo = tcp_echo(t.net.server());
    let proxy = SocketAddr::from(([127, 0, 0, 1], ClientPorts::MAIN.socks));
    // 200 MiB through SOCKS5 (sha256 checked): `bytes` (32 MiB) rotates the session carrying it, so the
    // download crosses at least one rotation and finishes on the draining session.
    let rotated = || t.client.log_text().matches("session rotated").count();
    let r0 = rotated();
    let took = t.download_checked(t.socks(), 78, 200 << 20, 120);
    let during = rotated() - r0;
    assert!(
        during >= 1,
        "{modes:?}: no rotation during the 200 MiB download ({took:?})"
    );
    eprintln!("{modes:?}: 200 MiB in {took:?} across {during} rotation(s)");
    let t0 = Instant::now();
    let before = rotated();
    let outcome = in_ns(t.net.client(), move || -> Result<(), String> {
        let mut idle: Vec<TcpStream> = (0..IDLE)
            .map(|i| socks5_connect(proxy, echo).map_err(|e| format!("idle {i}: {e}")))
            .collect::<Result<_, _>>()?;
        for (i, c) in idle.iter_mut().enumerate() {
            echo_once(c, format!("idle {i} before").as_bytes())?;
        }
        let bulk = socks5_connect(proxy, echo).map_err(|e| format!("bulk: {e}"))?;
        let (sent, got) = paced_echo(bulk, 77, CHUNK, CHUNKS, PACE)?;
        if sent != got {
            return Err(format!("transfer sha256 {got} != sent {sent}"));
        }
        // The idle streams ride the first session, rotated out and draining: still working.
        for (i, c) in idle.iter_mut().enumerate() {
            echo_once(c, format!("idle {i} after").as_bytes())
                .map_err(|e| format!("idle {i} after the rotations: {e}"))?;
        }
        // A new stream goes through the current session.
        let mut fresh = socks5_connect(proxy, echo).map_err(|e| format!("fresh: {e}"))?;
        echo_once(&mut fresh, b"fresh").map_err(|e| format!("fresh: {e}"))?;
        Ok(())
    });
    outcome.unwrap_or_else(|e| panic!("{modes:?}: {e}"));
    let took = t0.elapsed();
    let log = t.client.log_text();
    let rotations = log.matches("session rotated").count() - before;
    assert!(
        rotations >= 2,
        "{modes:?}: {rotations} rotations during the transfer ({took:?}):\n{log}"
    );
    // Every stream has ended: the rotated-out sessions close, one live session remains on the client.
    let settled = poll(Duration::from_secs(10), || {
        let s = scrape(t.net.client());
        (series_sum(&s, "paqet_sessions{role=\"client\"}") == 1.0).then_some(())
    });
    assert!(
        settled.is_some(),
        "{modes:?}: the client still has rotated-out sessions:\n{}",
        scrape(t.net.client())
    );
    assert!(
        t.client
            .log_text()
            .contains("rotated out: its streams have ended"),
        "{modes:?}: no rotated-out session closed after its streams ended"
    );
    // The server lets go of the rotated-out sessions (smux keep-alive timeout, 4 s here).
    let closed = poll(Duration::from_secs(15), || {
        let s = scrape(t.net.server());
        (metric_sum(&s, "paqet_session_closes_total") >= 1.0).then_some(())
    });
    assert!(
        closed.is_some(),
        "{modes:?}: the server closed no session:\n{}",
        scrape(t.net.server())
    );
    eprintln!("{modes:?}: {rotations} rotations during the test, transfer and checks in {took:?}");
}

#[test]
fn rotation_keeps_streams_pcap() {
    if skip(
        "rotation_keeps_streams_pcap",
        &["curl", "iptables", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    rotation("rtp", (Mode::Pcap, Mode::Pcap));
}

#[test]
fn rotation_keeps_streams_xdp_generic() {
    if skip("rotation_keeps_streams_xdp_generic", &["curl", "ethtool"]) {
        return;
    }
    let _serial = serial();
    rotation("rtx", (Mode::XdpGeneric, Mode::XdpGeneric));
}
