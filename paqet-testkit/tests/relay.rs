//! Root-only: the impaired link delays UDP both ways with its relay on a thread (`ImpairedLink::new`) and as
//! the `paqet-impair` binary (`ImpairedLink::with_relay_bin`); a relay that cannot start is an error, not a
//! hang. Skips with a message when not root or without nfnetlink_queue.
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use paqet_testkit::impair::{ImpairError, ImpairedLink, LinkSpec};
use paqet_testkit::netns::is_root;

const RELAY: &str = env!("CARGO_BIN_EXE_paqet-impair");
const PORT: u16 = 7401;
const ROUNDS: usize = 10;

fn can_run() -> bool {
    if !is_root() {
        eprintln!("skipping: needs root (network namespaces, iptables, NFQUEUE)");
        return false;
    }
    if !Path::new("/proc/net/netfilter/nfnetlink_queue").exists() {
        eprintln!("skipping: kernel has no nfnetlink_queue");
        return false;
    }
    true
}

fn spec(delay_ms: u32) -> LinkSpec {
    LinkSpec {
        delay_ms,
        jitter_ms: 0,
        loss_pct: 0.0,
        dup_pct: 0.0,
        seed: 1,
    }
}

/// Echoes `ROUNDS` UDP datagrams from A to B and back; returns the round-trip times.
fn udp_rtts(l: &ImpairedLink) -> Vec<Duration> {
    let server_addr = SocketAddr::from((l.b_ip, PORT));
    let server = l.b.spawn(move || {
        let s = UdpSocket::bind(server_addr).expect("bind echo socket in B");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..ROUNDS {
            let (n, from) = s.recv_from(&mut buf).expect("echo request");
            s.send_to(&buf[..n], from).expect("echo reply");
        }
    });
    // The echo socket is bound within milliseconds; requests sent earlier would get an ICMP error.
    std::thread::sleep(Duration::from_millis(200));
    let rtts =
        l.a.spawn(move || {
            let c = UdpSocket::bind("0.0.0.0:0").expect("bind client socket in A");
            c.connect(server_addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 64];
            (0..ROUNDS)
                .map(|i| {
                    let t = Instant::now();
                    c.send(&[i as u8; 32]).expect("send request");
                    let n = c.recv(&mut buf).expect("echo reply within 2 s");
                    assert_eq!(&buf[..n], &[i as u8; 32], "reply {i} is the request's echo");
                    t.elapsed()
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("client thread")
        .expect("enter namespace A");
    server
        .join()
        .expect("echo thread")
        .expect("enter namespace B");
    rtts
}

fn assert_delayed(rtts: &[Duration], delay_ms: u32) {
    let min = rtts.iter().min().expect("some round trips");
    let want = Duration::from_millis(2 * u64::from(delay_ms));
    assert!(*min >= want, "min RTT {min:?}, want ≥ {want:?}: {rtts:?}");
    assert!(
        rtts.iter().all(|r| *r < want + Duration::from_millis(500)),
        "a round trip took far longer than the delay: {rtts:?}"
    );
}

#[test]
fn relay_thread_delays_both_directions() {
    if !can_run() {
        return;
    }
    let l = ImpairedLink::new("kt", spec(15)).expect("impaired link");
    assert_delayed(&udp_rtts(&l), 15);
    let t = Instant::now();
    drop(l);
    // The relay checks its stop flag at least every 200 ms; the rest is namespace teardown.
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "drop took {:?}",
        t.elapsed()
    );
}

#[test]
fn relay_binary_delays_both_directions() {
    if !can_run() {
        return;
    }
    let l = ImpairedLink::with_relay_bin("kb", spec(15), Path::new(RELAY)).expect("impaired link");
    assert_delayed(&udp_rtts(&l), 15);
}

#[test]
fn missing_relay_binary_is_an_error() {
    if !can_run() {
        return;
    }
    match ImpairedLink::with_relay_bin("km", spec(5), Path::new("/nonexistent/paqet-impair")) {
        Err(ImpairError::RelayNotReady(_) | ImpairError::RelaySpawn { .. }) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a link without its relay must not come up"),
    }
}

#[test]
fn set_spec_changes_the_link_while_it_runs() {
    if !can_run() {
        return;
    }
    // Named like the benchmarks' namespaces (`pqb…`), starting without a relay.
    let mut l = ImpairedLink::with_prefix("pqb", "ks", spec(0), None).expect("impaired link");
    assert!(l.a.name().starts_with("pqb") && l.m.name().ends_with("ksM"));
    let clean = udp_rtts(&l);
    assert!(
        clean.iter().all(|r| *r < Duration::from_millis(20)),
        "no delay configured yet: {clean:?}"
    );
    l.set_spec(spec(15)).expect("delay on");
    assert_eq!(l.spec(), spec(15));
    assert_delayed(&udp_rtts(&l), 15);
    l.set_spec(spec(0)).expect("delay off");
    let rtts = udp_rtts(&l);
    assert!(
        rtts.iter().all(|r| *r < Duration::from_millis(20)),
        "the delay outlived set_spec: {rtts:?}"
    );
    // Bad settings are refused and leave the link as it was.
    assert!(matches!(
        l.set_spec(LinkSpec {
            loss_pct: 101.0,
            ..spec(0)
        }),
        Err(ImpairError::Spec(_))
    ));
    assert_eq!(l.spec(), spec(0));
}
