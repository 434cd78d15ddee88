//! In-process tests: a client worker and a server worker joined by the in-memory packet backend
//! (`io::mem`), both on one `LocalSet`. Every wait is bounded by a generous timeout that only turns a hang
//! into a failure; nothing asserts on timing.
use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::*;
use crate::io::mem;
use crate::proto::guard::GuardBind;
use crate::proto::kcp::{KcpConfig, KcpMode};
use crate::proto::smux::SmuxConfig;
use crate::wire::crypt::{BlockMode, Crypto};

const BOUND: Duration = Duration::from_secs(60);
const CLIENT: &str = "10.9.0.1:40000";
const SERVER: &str = "10.9.0.2:9999";

fn session_cfg(block: BlockMode) -> SessionConfig {
    let mut kcp = KcpConfig::preset(KcpMode::Fast3);
    kcp.sndwnd = 1024;
    kcp.rcvwnd = 1024;
    SessionConfig {
        crypto: Crypto::from_derived(block, &[0x42; 32]).expect("crypto"),
        dshard: 0,
        pshard: 0,
        kcp,
        smux: SmuxConfig::default(),
        mtu: 1350,
    }
}

fn cfg(role: Role, limits: Limits, guard: Option<(GuardConfig, String)>) -> WorkerConfig {
    let (me, mac, peer_mac) = match role {
        Role::Client => (CLIENT, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
        Role::Server => (SERVER, [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]),
    };
    let _ = mac;
    WorkerConfig {
        role,
        session: session_cfg(BlockMode::Aes),
        local_mac: mac,
        ipv4: Some(FamilyConfig {
            addr: me.parse().unwrap(),
            router_mac: peer_mac,
        }),
        ipv6: None,
        server_addr: (role == Role::Client).then(|| SERVER.parse().unwrap()),
        servers: Vec::new(),
        conn: 1,
        local_flags: vec![TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0)],
        remote_flags: vec![TcpFlags(TcpFlags::ACK.0)],
        guard,
        probe_response: Default::default(),
        limits,
        header_timeout: Duration::from_secs(10),
        rotate: Default::default(),
        reverse: Default::default(),
        targets: Default::default(),
        replay: None,
        noise: None,
    }
}

/// Factory handing out one pre-made backend (a second call fails: no re-dial in these tests).
fn once(io: mem::MemIo) -> IoFactory {
    let mut slot = Some(io);
    Box::new(move |_port| {
        slot.take()
            .map(|io| Box::new(io) as Box<dyn PacketIo>)
            .ok_or_else(|| std::io::Error::other("test backend already used"))
    })
}

/// Runs `body` with a started server and client joined by a memory link.
fn with_pair<F, Fut>(limits: Limits, guard: Option<(GuardConfig, String)>, body: F)
where
    F: FnOnce(Tunnel, Shared) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (a, b) = mem::pair(4096);
        let server =
            start(cfg(Role::Server, limits, guard.clone()), once(b)).expect("server start");
        let client =
            start(cfg(Role::Client, Limits::default(), guard), once(a)).expect("client start");
        let tunnel = client.tunnel.expect("client tunnel");
        tokio::time::timeout(BOUND, body(tunnel, server.shared))
            .await
            .expect("test body timed out");
    });
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::task::spawn_local(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            tokio::task::spawn_local(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 131 + seed as usize) % 251) as u8)
        .collect()
}

/// Writes `data` and reads the echo concurrently; returns what came back.
async fn echo_through(s: TunnelStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(s);
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
    let (_w, got) = tokio::join!(writer, reader);
    got
}

#[test]
fn tcp_echo_through_the_tunnel_is_byte_exact() {
    with_pair(Limits::default(), None, |tunnel, server| async move {
        let echo = echo_server().await;
        let data = pattern(4 << 20, 7);
        let want = Sha256::digest(&data);
        let s = tunnel
            .open_tcp("127.0.0.1", echo.port())
            .await
            .expect("open_tcp");
        let got = echo_through(s, data).await;
        assert_eq!(Sha256::digest(&got), want);
        // Several streams at once on the same session.
        let mut tasks = Vec::new();
        for k in 0..8u8 {
            let t = tunnel.clone();
            tasks.push(tokio::task::spawn_local(async move {
                let d = pattern(200_000 + k as usize * 1000, k);
                let s = t
                    .open_tcp("127.0.0.1", echo.port())
                    .await
                    .expect("open_tcp");
                let got = echo_through(s, d.clone()).await;
                assert_eq!(got, d, "stream {k}");
            }));
        }
        for t in tasks {
            t.await.expect("stream task");
        }
        assert_eq!(server.borrow().session_count(), 1);
        assert!(
            server.borrow().stats().streams_opened > 9 * 3,
            "{:?}",
            server.borrow().stats()
        );
    });
}

#[test]
fn udp_datagrams_keep_their_boundaries() {
    with_pair(Limits::default(), None, |tunnel, _server| async move {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = echo.local_addr().unwrap().port();
        tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 8192];
            loop {
                let Ok((n, from)) = echo.recv_from(&mut buf).await else {
                    return;
                };
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let s = tunnel.open_udp("127.0.0.1", port).await.expect("open_udp");
        for (i, len) in [1usize, 20, 1400, 4096].into_iter().enumerate() {
            let d = pattern(len, i as u8);
            s.send_datagram(&d).await.expect("send");
            let back = s.recv_datagram().await.expect("recv").expect("not closed");
            assert_eq!(back, d, "datagram of {len} bytes");
        }
        assert!(s.send_datagram(&[0u8; 4097]).await.is_err());
    });
}

#[test]
fn ping_gets_pong_and_ptcpf_is_stored() {
    with_pair(Limits::default(), None, |tunnel, server| async move {
        tunnel.ping().await.expect("ping");
        let c = server.borrow();
        let peer: SocketAddr = CLIENT.parse().unwrap();
        let flags = c
            .peer_flags
            .get(&peer)
            .expect("PTCPF stored for the client");
        assert_eq!(flags.flags(), &[TcpFlags(TcpFlags::ACK.0)]);
    });
}

/// Waits (bounded by the test's overall timeout) until `cond` holds on the server core.
async fn until(server: &Shared, cond: impl Fn(&core::Core) -> bool) {
    while !cond(&server.borrow()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn stream_limit_closes_the_excess() {
    // Each user stream costs three smux streams (probe, PTCPF, target), opened in one go. The limits count
    // proxied (PTCP/PUDP) streams only: with a per-session limit of 1 the first user stream fits; while it
    // is held, the next one's target stream is closed by the server after its header.
    let limits = Limits {
        max_sessions: None,
        max_streams_total: None,
        max_streams_per_session: Some(1),
    };
    with_pair(limits, None, |tunnel, server| async move {
        let echo = echo_server().await;
        // Let the session-start PTCPF stream come and go first.
        until(&server, |c| c.session_count() == 1 && c.stream_count() == 0).await;
        let mut a = tunnel.open_tcp("127.0.0.1", echo.port()).await.unwrap();
        a.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        until(&server, |c| c.stream_count() == 1).await;
        let mut b = tunnel.open_tcp("127.0.0.1", echo.port()).await.unwrap();
        let mut rest = Vec::new();
        let n = b.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(
            n, 0,
            "the stream over the limit must be closed without data"
        );
        assert_eq!(server.borrow().stats().streams_rejected, 1);
        // The admitted stream still works.
        a.write_all(b"again").await.unwrap();
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
    });
}

#[test]
fn session_limit_refuses_new_sessions() {
    let limits = Limits {
        max_sessions: Some(0),
        max_streams_total: None,
        max_streams_per_session: None,
    };
    with_pair(limits, None, |tunnel, server| async move {
        let r = tokio::time::timeout(Duration::from_secs(2), tunnel.ping()).await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "no PONG may come back from a server with max_sessions 0"
        );
        assert_eq!(server.borrow().session_count(), 0);
        assert!(server.borrow().stats().sessions_rejected > 0);
    });
}

#[test]
fn guard_on_both_ends_carries_traffic() {
    for g in [
        GuardConfig::tag(GuardBind::Port),
        GuardConfig::tag(GuardBind::FourTuple),
        GuardConfig::cookie(*b"PQT1", 30, 1),
    ] {
        guard_pair(g);
    }
}

fn guard_pair(g: GuardConfig) {
    with_pair(
        Limits::default(),
        Some((g, "guard-test-key".into())),
        |tunnel, server| async move {
            let echo = echo_server().await;
            let s = tunnel.open_tcp("127.0.0.1", echo.port()).await.unwrap();
            let d = pattern(100_000, 3);
            assert_eq!(echo_through(s, d.clone()).await, d);
            assert_eq!(server.borrow().stats().rx_guard_drops, 0);
        },
    );
}

/// The client's stream sequence is upstream's (spec §3.9, captures README): sid 3 = PTCPF at session start,
/// then per user stream an empty probe (5), a PTCPF re-send (7) and the PTCP stream (9) whose first bytes
/// are the header — checked against a hand-driven sans-IO server session.
#[test]
fn client_stream_sequence_matches_upstream() {
    use crate::proto::session::Session;
    use crate::wire::envelope::{parse_frame, EnvelopeBuilder};
    use std::collections::BTreeMap;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (a, mut b) = mem::pair(4096);
        let mut ccfg = cfg(Role::Client, Limits::default(), None);
        ccfg.remote_flags = vec![TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0)];
        let client = start(ccfg, once(a)).expect("client start");
        let tunnel = client.tunnel.expect("tunnel");
        tokio::task::spawn_local(async move {
            let s = tunnel.open_tcp("127.0.0.1", 8000).await.expect("open_tcp");
            std::future::pending::<()>().await;
            drop(s);
        });
        let scfg = session_cfg(BlockMode::Aes);
        let mut server: Option<Session> = None;
        let mut env = EnvelopeBuilder::new(
            [2, 0, 0, 0, 0, 2],
            [2, 0, 0, 0, 0, 1],
            SERVER.parse().unwrap(),
            CLIENT.parse().unwrap(),
            1,
        )
        .unwrap();
        let start_at = std::time::Instant::now();
        let mut order = Vec::new();
        let mut data: BTreeMap<u32, (Vec<u8>, bool)> = BTreeMap::new();
        let ptcp: &[u8] = &[
            0x50, 0x01, 0x04, 0x00, 0x0c, 0x09, b'1', b'2', b'7', b'.', b'0', b'.', b'0', b'.',
            b'1', 0x1f, 0x40,
        ];
        while data.get(&9).is_none_or(|(d, _)| d.len() < ptcp.len()) {
            assert!(
                start_at.elapsed() < BOUND,
                "sequence incomplete: {order:?} {data:?}"
            );
            let mut frames = Vec::new();
            b.recv_batch(Duration::ZERO, &mut |f| frames.push(f.to_vec()))
                .unwrap();
            let now = start_at.elapsed().as_millis() as u32;
            for mut f in frames {
                let p = parse_frame(&f, Some(9999)).expect("client frame parses");
                let off = p.payload.as_ptr() as usize - f.as_ptr() as usize;
                let payload = &mut f[off..];
                let s = server.get_or_insert_with(|| {
                    let mut copy = payload.to_vec();
                    let body = scfg.crypto.open(&mut copy).expect("decrypts").start;
                    let conv = u32::from_le_bytes(copy[body..body + 4].try_into().unwrap());
                    Session::new(Role::Server, conv, &scfg, now).expect("session")
                });
                s.handle_datagram(now, payload).expect("datagram accepted");
            }
            if let Some(s) = server.as_mut() {
                while let Some(ev) = s.poll_event() {
                    match ev {
                        crate::proto::smux::SmuxEvent::Opened(sid) => {
                            order.push(sid);
                            data.entry(sid).or_default();
                        }
                        crate::proto::smux::SmuxEvent::Closed(e) => {
                            panic!("server session died: {e}")
                        }
                        _ => {}
                    }
                }
                for (sid, (d, fin)) in data.iter_mut() {
                    let mut buf = [0u8; 256];
                    loop {
                        let n = s.read(*sid, &mut buf).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        d.extend_from_slice(&buf[..n]);
                    }
                    *fin |= s.is_fin(*sid);
                }
                s.poll_transmit(now, &mut |dgram: &[u8]| {
                    let mut out = vec![0u8; 128 + dgram.len()];
                    let n = env
                        .emit_with_payload(
                            TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0),
                            dgram,
                            &mut out,
                        )
                        .unwrap();
                    b.send(&out[..n]).unwrap();
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ptcpf: &[u8] = &[0x50, 0x01, 0x03, 0x00, 0x03, 0x01, 0x00, 0x18];
        assert_eq!(order, vec![3, 5, 7, 9], "stream ids in opening order");
        assert_eq!(data[&3].0, ptcpf, "session-start PTCPF");
        assert_eq!(data[&5].0, b"", "liveness probe carries nothing");
        assert_eq!(data[&7].0, ptcpf, "PTCPF re-send");
        assert_eq!(
            data[&9].0, ptcp,
            "PTCP header for 127.0.0.1:8000 (captures README)"
        );
        assert!(
            data[&3].1 && data[&5].1 && data[&7].1,
            "probe and PTCPF streams are closed at once"
        );
        assert!(!data[&9].1, "the user stream stays open");
    });
}

/// Spec §3.5: the same source with a different conv and sn 0 replaces the old session (a client restarted
/// with the same port); other conv changes mid-stream are not a new session.
#[test]
fn new_conversation_from_the_same_source_replaces_the_session() {
    use crate::proto::session::Session;
    use crate::wire::envelope::EnvelopeBuilder;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (mut a, b) = mem::pair(4096);
        let server =
            start(cfg(Role::Server, Limits::default(), None), once(b)).expect("server start");
        let shared = server.shared;
        let scfg = session_cfg(BlockMode::Aes);
        let mut env = EnvelopeBuilder::new(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            CLIENT.parse().unwrap(),
            SERVER.parse().unwrap(),
            1,
        )
        .unwrap();
        let start_at = std::time::Instant::now();
        // Opens a stream on a fresh client session with `conv` and pushes its datagrams to the server.
        let mut push = |conv: u32| {
            let now = start_at.elapsed().as_millis() as u32;
            let mut s = Session::new(Role::Client, conv, &scfg, now).expect("session");
            let sid = s.open_stream().unwrap();
            s.write(sid, &[0x50, 0x01, 0x01, 0x00, 0x00]).unwrap(); // PING
            s.poll_transmit(now, &mut |dgram: &[u8]| {
                let mut out = vec![0u8; 128 + dgram.len()];
                let n = env
                    .emit_with_payload(TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0), dgram, &mut out)
                    .unwrap();
                a.send(&out[..n]).unwrap();
            });
        };
        push(0x1111_1111);
        until(&shared, |c| c.session_count() == 1).await;
        let first = shared
            .borrow()
            .sessions()
            .values()
            .next()
            .unwrap()
            .session
            .conv();
        assert_eq!(first, 0x1111_1111);
        // Restarted client, same address, new conv: the old session goes, the retransmission opens the new one.
        push(0x2222_2222);
        until(&shared, |c| c.stats().sessions_replaced == 1).await;
        push(0x2222_2222);
        until(&shared, |c| {
            c.sessions()
                .values()
                .any(|e| e.session.conv() == 0x2222_2222)
        })
        .await;
        let c = shared.borrow();
        assert_eq!(c.session_count(), 1);
        assert_eq!(c.stats().sessions_opened, 2);
    });
}

#[test]
fn xdp_steer_config_matches_address_port_and_guard() {
    use paqet_common::SteerConfig;
    let g = GuardConfig::cookie(*b"ABCD", 30, 1);
    let sc = super::xdp::steer_config(&cfg(Role::Server, Limits::default(), Some((g, "k".into()))));
    assert_eq!(sc.port, 9999);
    assert_eq!(sc.ipv4, [10, 9, 0, 2]);
    assert!(sc.has(SteerConfig::FLAG_IPV4) && sc.has(SteerConfig::FLAG_IPV4_ADDR));
    assert!(!sc.has(SteerConfig::FLAG_IPV6) && !sc.has(SteerConfig::FLAG_IPV6_ADDR));
    assert!(sc.has(SteerConfig::FLAG_GUARD));
    assert!(!sc.has(SteerConfig::FLAG_GUARD_TAG));
    assert_eq!(&sc.guard_magic, b"ABCD");
    assert!(
        sc.has(SteerConfig::FLAG_PROBE_CLOSED),
        "probe_response defaults to closed"
    );
    let off = super::xdp::steer_config(&cfg(Role::Server, Limits::default(), None));
    assert!(!off.has(SteerConfig::FLAG_GUARD));
    for (bind, flag) in [
        (GuardBind::Port, SteerConfig::FLAG_BIND_PORT),
        (GuardBind::FourTuple, SteerConfig::FLAG_BIND_4TUPLE),
        (GuardBind::None, 0),
    ] {
        let g = GuardConfig::tag(bind);
        let mut w = cfg(Role::Server, Limits::default(), Some((g, "k".into())));
        w.probe_response = crate::proto::guard::ProbeResponse::Silent;
        let sc = super::xdp::steer_config(&w);
        assert!(sc.has(SteerConfig::FLAG_GUARD | SteerConfig::FLAG_GUARD_TAG));
        let binds = sc.flags & (SteerConfig::FLAG_BIND_PORT | SteerConfig::FLAG_BIND_4TUPLE);
        assert_eq!(binds, flag, "{bind:?}");
        assert!(!sc.has(SteerConfig::FLAG_PROBE_CLOSED));
    }
}

#[test]
fn bad_fec_shard_counts_fail_the_worker_start() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (_a, b) = mem::pair(16);
        let mut c = cfg(Role::Server, Limits::default(), None);
        c.session.dshard = 200;
        c.session.pshard = 100;
        let err = match start(c, once(b)) {
            Ok(_) => panic!("a worker started with dshard 200 + pshard 100"),
            Err(e) => e,
        };
        assert!(matches!(err, StartError::Config(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("transport.kcp.dshard = 200")
                && msg.contains("transport.kcp.pshard = 100"),
            "{msg}"
        );
    });
}
