//! Interop with real Go code: Debian's `kcptun` (kcp-go + smux) uses the same kcp-go crypto framing, FEC and
//! smux as upstream paqet. Our sans-IO session runs over a UDP socket on loopback against `kcptun-server`
//! (our client, their server) and `kcptun-client` (their client, our server), for ciphers aes, aes-128,
//! salsa20, blowfish and none, FEC 10/3 and off, smux v2, several streams at once; every transfer is checked
//! by sha256. kcptun derives its key with PBKDF2-HMAC-SHA1(key, "kcp-go", 4096) and carries plain stream
//! bytes (no paqet header); it runs with `--nocomp`.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use paqet::proto::cc::CcConfig;
use paqet::proto::kcp::{KcpConfig, KcpMode};
use paqet::proto::session::{Role, Session, SessionConfig};
use paqet::proto::smux::{SmuxConfig, SmuxEvent};
use paqet::wire::crypt::{derive_key_with, BlockMode, Crypto, PbkdfHash};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const KEY: &str = "paqet-dp interop key";
const STREAMS: usize = 4;
const PER_STREAM: usize = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

fn kcptun_available() -> bool {
    let ok = Command::new("kcptun-server")
        .arg("--version")
        .output()
        .is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("kcptun is not installed (scripts/setup.sh installs it)");
        }
        eprintln!("SKIP: kcptun not installed (apt-get install kcptun)");
    }
    ok
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn session_config(block: BlockMode, fec: bool) -> SessionConfig {
    let dkey = derive_key_with(KEY, b"kcp-go", 4096, PbkdfHash::Sha1);
    let crypto = Crypto::from_derived(block, &dkey).expect("cipher");
    let mut kcp = KcpConfig::preset(KcpMode::Fast);
    kcp.sndwnd = 1024;
    kcp.rcvwnd = 1024;
    // The daemon's default congestion control: our sender paces, the wire stays kcp-go's.
    kcp.cc = CcConfig::BBR;
    let smux = SmuxConfig {
        version: 2,
        keepalive_interval_ms: 10_000,
        keepalive_timeout_ms: 30_000,
        ..SmuxConfig::default()
    };
    SessionConfig {
        crypto,
        dshard: if fec { 10 } else { 0 },
        pshard: if fec { 3 } else { 0 },
        kcp,
        smux,
        mtu: 1350,
    }
}

fn kcptun_args(block: BlockMode, fec: bool) -> Vec<String> {
    let (ds, ps) = if fec { ("10", "3") } else { ("0", "0") };
    [
        "--key",
        KEY,
        "--crypt",
        block.as_str(),
        "--mode",
        "fast",
        "--nocomp",
        "--smuxver",
        "2",
        "--ds",
        ds,
        "--ps",
        ps,
        "--sndwnd",
        "1024",
        "--rcvwnd",
        "1024",
        "--keepalive",
        "10",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A TCP echo server on loopback (kcptun-server's target); stops when `stop` is set.
fn echo_server(stop: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    thread::spawn(move || {
                        let mut r = s.try_clone().unwrap();
                        let _ = std::io::copy(&mut r, &mut s);
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    addr
}

fn payload(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; PER_STREAM];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Drives one session over a UDP socket: receive, timers, transmit. `app` runs between rounds.
fn drive(
    sock: &UdpSocket,
    peer: Option<SocketAddr>,
    session: &mut Option<(Session, SocketAddr)>,
    cfg: &SessionConfig,
    start: Instant,
    mut app: impl FnMut(&mut Session) -> bool,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        assert!(
            start.elapsed() < DEADLINE,
            "interop transfer did not finish in {DEADLINE:?}"
        );
        let now = start.elapsed().as_millis() as u32;
        // Receive everything pending (wait up to 1 ms for the first datagram).
        sock.set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if peer.is_some_and(|p| p != from) {
                continue;
            }
            if session.is_none() {
                // Server: the first datagram from a new source opens the session with its conv.
                let mut probe = buf[..n].to_vec();
                let c = cfg.crypto.clone();
                let Ok(r) = c.open(&mut probe) else { continue };
                let body = &probe[r];
                let kcp = if cfg.dshard > 0 && paqet::wire::fec::is_fec(body) {
                    match paqet::wire::fec::parse(body) {
                        Ok(p) => p.payload.to_vec(),
                        Err(_) => continue,
                    }
                } else {
                    body.to_vec()
                };
                let Some(conv) = paqet::wire::kcp::peek_conv(&kcp) else {
                    continue;
                };
                *session = Some((
                    Session::new(Role::Server, conv, cfg, now).expect("session"),
                    from,
                ));
            }
            let (s, _) = session.as_mut().unwrap();
            let _ = s.handle_datagram(now, &mut buf[..n]);
            sock.set_read_timeout(Some(Duration::from_micros(1))).ok();
            sock.set_nonblocking(true).unwrap();
        }
        sock.set_nonblocking(false).unwrap();
        let Some((s, to)) = session.as_mut() else {
            continue;
        };
        let to = *to;
        if app(s) {
            // Give the last ACKs/FINs a moment to leave.
            for _ in 0..20 {
                let now = start.elapsed().as_millis() as u32;
                s.poll_transmit(now, &mut |d| {
                    let _ = sock.send_to(d, to);
                });
                thread::sleep(Duration::from_millis(5));
            }
            return;
        }
        s.poll_transmit(now, &mut |d| {
            let _ = sock.send_to(d, to);
        });
    }
}

/// Our client against kcptun-server → TCP echo: STREAMS streams, each sends PER_STREAM bytes and must read
/// the same bytes back.
fn ours_to_theirs(block: BlockMode, fec: bool) {
    if !kcptun_available() {
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_server(stop.clone());
    let port = free_udp_port();
    let mut args = kcptun_args(block, fec);
    args.extend([
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--target".into(),
        echo.to_string(),
    ]);
    let _srv = Proc(
        Command::new("kcptun-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    thread::sleep(Duration::from_millis(300));
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let cfg = session_config(block, fec);
    let start = Instant::now();
    let mut sess = Some((
        Session::new(Role::Client, rand::random(), &cfg, 0).expect("session"),
        server,
    ));
    let data: Vec<Vec<u8>> = (0..STREAMS as u64).map(payload).collect();
    let sids: Vec<u32> = (0..STREAMS)
        .map(|_| sess.as_mut().unwrap().0.open_stream().unwrap())
        .collect();
    let mut sent = [0usize; STREAMS];
    let mut echoed: Vec<Vec<u8>> = vec![Vec::new(); STREAMS];
    let mut rbuf = vec![0u8; 64 * 1024];
    drive(&sock, Some(server), &mut sess, &cfg, start, |s| {
        while let Some(ev) = s.poll_event() {
            if let SmuxEvent::Closed(e) = ev {
                panic!("session died: {e}");
            }
        }
        for i in 0..STREAMS {
            if sent[i] < PER_STREAM {
                sent[i] += s.write(sids[i], &data[i][sent[i]..]).unwrap();
            }
            loop {
                let n = s.read(sids[i], &mut rbuf).unwrap();
                if n == 0 {
                    break;
                }
                echoed[i].extend_from_slice(&rbuf[..n]);
            }
        }
        (0..STREAMS).all(|i| echoed[i].len() >= PER_STREAM)
    });
    for i in 0..STREAMS {
        assert_eq!(
            Sha256::digest(&echoed[i]),
            Sha256::digest(&data[i]),
            "stream {i}: echo differs"
        );
    }
    stop.store(true, Ordering::Relaxed);
}

/// kcptun-client → our server (which echoes every stream): STREAMS TCP connections through kcptun-client.
fn theirs_to_ours(block: BlockMode, fec: bool) {
    if !kcptun_available() {
        return;
    }
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let our = sock.local_addr().unwrap();
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let local_addr = local.local_addr().unwrap();
    drop(local);
    let mut args = kcptun_args(block, fec);
    args.extend([
        "--localaddr".into(),
        local_addr.to_string(),
        "--remoteaddr".into(),
        our.to_string(),
    ]);
    let _cli = Proc(
        Command::new("kcptun-client")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    thread::sleep(Duration::from_millis(300));
    let done = Arc::new(AtomicBool::new(false));
    // Application side: STREAMS TCP connections into kcptun-client, each writes and reads its echo.
    let mut apps = Vec::new();
    for i in 0..STREAMS as u64 {
        let done = done.clone();
        apps.push(thread::spawn(move || {
            let data = payload(100 + i);
            let mut c = TcpStream::connect(local_addr).expect("connect kcptun-client");
            let mut w = c.try_clone().unwrap();
            let d2 = data.clone();
            let wt = thread::spawn(move || w.write_all(&d2).unwrap());
            let mut back = vec![0u8; PER_STREAM];
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            c.read_exact(&mut back).expect("echo through kcptun-client");
            wt.join().unwrap();
            let _ = done;
            Sha256::digest(&back) == Sha256::digest(&data)
        }));
    }
    let cfg = session_config(block, fec);
    let start = Instant::now();
    let mut sess: Option<(Session, SocketAddr)> = None;
    let mut streams: HashMap<u32, Vec<u8>> = HashMap::new(); // sid → bytes waiting to be echoed
    let mut rbuf = vec![0u8; 64 * 1024];
    let apps_done = |apps: &Vec<thread::JoinHandle<bool>>| apps.iter().all(|a| a.is_finished());
    drive(&sock, None, &mut sess, &cfg, start, |s| {
        while let Some(ev) = s.poll_event() {
            match ev {
                SmuxEvent::Opened(sid) => {
                    streams.insert(sid, Vec::new());
                }
                SmuxEvent::Closed(e) => panic!("session died: {e}"),
                _ => {}
            }
        }
        for (sid, pending) in streams.iter_mut() {
            loop {
                let n = s.read(*sid, &mut rbuf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&rbuf[..n]);
            }
            if !pending.is_empty() {
                let n = s.write(*sid, pending).unwrap_or(0);
                pending.drain(..n);
            }
        }
        apps_done(&apps)
    });
    done.store(true, Ordering::Relaxed);
    for (i, a) in apps.into_iter().enumerate() {
        assert!(
            a.join().unwrap(),
            "stream {i}: echo through kcptun-client differs"
        );
    }
}

macro_rules! interop {
    ($($name:ident: $block:expr, $fec:expr;)*) => {
        mod ours_to_theirs { use super::*; $( #[test] fn $name() { ours_to_theirs($block, $fec) } )* }
        mod theirs_to_ours { use super::*; $( #[test] fn $name() { theirs_to_ours($block, $fec) } )* }
    };
}

interop! {
    aes: BlockMode::Aes, false;
    aes_fec: BlockMode::Aes, true;
    aes128: BlockMode::Aes128, false;
    aes128_fec: BlockMode::Aes128, true;
    salsa20: BlockMode::Salsa20, false;
    salsa20_fec: BlockMode::Salsa20, true;
    blowfish: BlockMode::Blowfish, false;
    blowfish_fec: BlockMode::Blowfish, true;
    none: BlockMode::None, false;
    none_fec: BlockMode::None, true;
}
