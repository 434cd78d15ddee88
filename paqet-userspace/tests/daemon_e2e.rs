//! End to end through the real binary on the pcap path (root only; skipped otherwise).
//!
//! Two network namespaces joined by a veth pair; the server namespace runs a TCP echo and a UDP echo
//! server on loopback; `paqet-dp run` runs as server in B and as client in A with a TCP and a UDP port
//! forward, with the iptables NOTRACK / RST-drop rules (spec §2.4) applied in each namespace. 16 MiB go
//! through the TCP forward and come back (sha256 compared for both directions), and a UDP datagram makes
//! the round trip through the UDP forward. Every wait is bounded; children are killed in `Drop`.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

#[test]
fn tcp_and_udp_forwards_through_two_daemons() {
    if skip("tcp_and_udp_forwards_through_two_daemons", &[]) {
        return;
    }
    let net = Net::direct("e2e");
    net.apply_firewall(true, true);

    // Echo servers on the server side's loopback (threads inside namespace B; they die with the process).
    let tcp_echo = tcp_echo(net.server());
    let udp_echo = UdpEcho::start(net.server());

    let dir = TempDir::new("daemon");
    let mut opts = Opts::new((Mode::Pcap, Mode::Pcap));
    // Short keepalive timeout: the client notices the server restart below quickly.
    opts.smuxktimeout = 2;
    let server_cfg = Tunnel::server_config(&net, &opts);
    let ports = ClientPorts::MAIN;
    let (fwd_tcp, fwd_udp) = (ports.fwd_http, ports.fwd_udp);
    let client_cfg = Tunnel::client_config_to(
        &net,
        &opts,
        tcp_echo,
        udp_echo.addr,
        ports,
        &opts.client_key,
    );
    let mut server = Daemon::spawn(
        net.server(),
        dir.path(),
        "server",
        &server_cfg,
        Mode::Pcap,
        false,
    );
    let mut client = Daemon::spawn(
        net.client(),
        dir.path(),
        "client",
        &client_cfg,
        Mode::Pcap,
        false,
    );

    let result = in_ns(
        net.client(),
        move || -> std::io::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
            // TCP: 16 MiB out and back, concurrently.
            let fwd = SocketAddr::from(([127, 0, 0, 1], fwd_tcp));
            let c = retry(Duration::from_secs(20), || {
                TcpStream::connect_timeout(&fwd, Duration::from_secs(2))
            })?;
            c.set_read_timeout(Some(Duration::from_secs(60)))?;
            c.set_write_timeout(Some(Duration::from_secs(60)))?;
            let data = pattern_bytes(0x1234_5678, 16 << 20);
            let t0 = Instant::now();
            let got = echo_exchange(&c, &data)?;
            report("16 MiB each way (per direction)", 16 << 20, t0.elapsed());
            // UDP: one request/response through the UDP forward.
            let u = UdpSocket::bind("127.0.0.1:0")?;
            u.set_read_timeout(Some(Duration::from_secs(2)))?;
            let probe = b"paqet-udp-probe-0001".to_vec();
            let reply = retry(Duration::from_secs(20), || {
                u.send_to(&probe, ("127.0.0.1", fwd_udp))?;
                let mut buf = [0u8; 4096];
                let (n, _) = u.recv_from(&mut buf)?;
                Ok::<_, std::io::Error>(buf[..n].to_vec())
            })?;
            Ok((data, got, reply))
        },
    );
    let (sent, got, reply) =
        result.unwrap_or_else(|e| panic!("traffic through the tunnel failed: {e}"));
    assert_eq!(got.len(), sent.len());
    assert_eq!(
        hex::encode(Sha256::digest(&got)),
        hex::encode(Sha256::digest(&sent)),
        "16 MiB echoed through the TCP forward differ"
    );
    assert_eq!(
        reply, b"paqet-udp-probe-0001",
        "UDP echo through the UDP forward"
    );
    // Both daemons are still running (no crash on the way) and logged their sessions.
    server.assert_running();
    client.assert_running();
    assert!(
        client.log_text().contains("session dialled"),
        "client log:\n{}",
        client.log_text()
    );
    assert!(
        server.log_text().contains("new session"),
        "server log:\n{}",
        server.log_text()
    );

    // The server is stopped and started again: the client notices its sessions died (smux keepalive),
    // re-dials by itself, and new connections work again.
    drop(server);
    let server = Daemon::spawn(
        net.server(),
        dir.path(),
        "server2",
        &server_cfg,
        Mode::Pcap,
        false,
    );
    let recovered = in_ns(net.client(), move || -> std::io::Result<usize> {
        let fwd = SocketAddr::from(([127, 0, 0, 1], fwd_tcp));
        let data = pattern_bytes(0x1234_5678, 64 << 10);
        let mut attempts = 0;
        retry(Duration::from_secs(90), || {
            attempts += 1;
            let mut c = TcpStream::connect_timeout(&fwd, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            c.set_write_timeout(Some(Duration::from_secs(3)))?;
            c.write_all(&data)?;
            let mut got = vec![0u8; data.len()];
            c.read_exact(&mut got)?;
            if got != data {
                return Err(std::io::Error::other("echo differs"));
            }
            Ok(attempts)
        })
    });
    match recovered {
        Ok(n) => eprintln!("recovered after {n} attempt(s)"),
        Err(e) => panic!(
            "no working connection after the server restart: {e}\n--- client log ---\n{}\n--- server2 log ---\n{}",
            client.log_text(),
            server.log_text()
        ),
    }
    client.assert_running();
}
