//! What XDP mode changes for the host, shown side by side with pcap mode (issue: data plane):
//! - with NO iptables rules at all, a server in pcap mode makes its kernel answer tunnel packets with RSTs
//!   from the tunnel port, while a server in XDP mode (native or generic) sends none: the kernel never sees
//!   the packets;
//! - a daemon killed with SIGKILL leaves no XDP program attached (the program hangs on a bpf_link owned by
//!   the process).
//!
//! Root only (own namespaces); skips with a message otherwise. The capture runs on the client's side,
//! where every packet the server host sends arrives.
mod common;

use std::time::Duration;

use common::*;
use paqet_testkit::netns::Netns;

/// RSTs from the server's tunnel port during an 8 MiB download, with no iptables rules anywhere.
fn rsts_without_rules(tag: &str, server: Mode) -> usize {
    let mut o = Opts::new((server, Mode::Pcap));
    o.firewall = false;
    let t = Tunnel::start(tag, o);
    // Captured where the server's packets arrive (the client's side): an AF_XDP transmit skips the
    // server's own packet taps, while everything its kernel sends is seen here too.
    let cap = RstCapture::start(
        t.net.client(),
        &t.net.client_if,
        t.dir.path().join("rst.pcap"),
    );
    t.download_checked(t.socks(), 7, 8 << 20, 60);
    std::thread::sleep(Duration::from_millis(300));
    let (packets, rsts) = cap.count();
    // The capture must have seen the tunnel's own packets, or a zero would prove nothing.
    assert!(
        packets > 1000,
        "{server:?}: only {packets} packets from the tunnel port captured"
    );
    rsts
}

#[test]
fn xdp_server_sends_no_rsts_where_pcap_server_does() {
    if skip(
        "xdp_server_sends_no_rsts_where_pcap_server_does",
        &["curl", "tcpdump", "ethtool"],
    ) {
        return;
    }
    let _serial = serial();
    let pcap = rsts_without_rules("rsp", Mode::Pcap);
    let native = rsts_without_rules("rsn", Mode::XdpNative);
    let generic = rsts_without_rules("rsg", Mode::XdpGeneric);
    eprintln!("RSTs from the tunnel port without iptables rules: pcap {pcap}, xdp-native {native}, xdp-generic {generic}");
    assert!(
        pcap > 0,
        "a pcap-mode server without the rules should have its kernel reset tunnel packets"
    );
    assert_eq!(
        native, 0,
        "xdp-native server: the kernel must not see (and reset) tunnel packets"
    );
    assert_eq!(
        generic, 0,
        "xdp-generic server: the kernel must not see (and reset) tunnel packets"
    );
}

fn xdp_attached(ns: &Netns, dev: &str) -> bool {
    let out = ns
        .command("ip")
        .args(["-d", "link", "show", "dev", dev])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("prog/xdp") || text.contains(" xdp") || text.contains("xdpgeneric")
}

#[test]
fn killed_daemon_leaves_no_xdp_program_attached() {
    if skip("killed_daemon_leaves_no_xdp_program_attached", &["ethtool"]) {
        return;
    }
    let _serial = serial();
    for mode in [Mode::XdpNative, Mode::XdpGeneric] {
        let net = Net::direct(if mode == Mode::XdpNative {
            "kdn"
        } else {
            "kdg"
        });
        let dir = TempDir::new("kd");
        let cfg = Tunnel::server_config(&net, &Opts::new((mode, Mode::Pcap)));
        assert!(
            !xdp_attached(net.server(), &net.server_if),
            "{mode:?}: XDP attached before the daemon ran"
        );
        let mut d = Daemon::spawn(net.server(), dir.path(), "server", &cfg, mode, false);
        let up = poll(Duration::from_secs(20), || {
            xdp_attached(net.server(), &net.server_if).then_some(())
        });
        d.assert_running();
        assert!(
            up.is_some(),
            "{mode:?}: the daemon never attached its XDP program:\n{}",
            d.log_text()
        );
        d.kill(); // SIGKILL: no cleanup code runs
        let gone = poll(Duration::from_secs(10), || {
            (!xdp_attached(net.server(), &net.server_if)).then_some(())
        });
        assert!(
            gone.is_some(),
            "{mode:?}: an XDP program is still attached after SIGKILL"
        );
    }
}
