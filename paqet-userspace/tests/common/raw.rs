//! Raw frames for the active-prober tests: an AF_PACKET sniffer and injector on a namespace's interface;
//! the frame builders, parsers and the scan set are [`paqet_testkit::probe`]'s (shared with
//! `cargo xtask probe`).
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use paqet_testkit::netns::Netns;

use super::{ClientPorts, Tunnel};
#[allow(unused_imports)] // re-exported for the prober tests; unused by the others
pub use paqet_testkit::probe::*;

/// `sll_pkttype` of a frame this host sent.
pub const PACKET_OUTGOING: u8 = 4;

/// Captured frames: (`sll_pkttype`, bytes).
type Frames = Arc<Mutex<Vec<(u8, Vec<u8>)>>>;

/// Every frame seen on one interface (both directions), with its `sll_pkttype`; stopped on drop.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    frames: Frames,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Sniffer {
    /// Starts capturing on `dev` in `ns`; returns once the socket is bound.
    pub fn start(ns: &Netns, dev: &str) -> Sniffer {
        let stop = Arc::new(AtomicBool::new(false));
        let frames: Frames = Arc::default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s, f) = (stop.clone(), frames.clone());
        let dev = std::ffi::CString::new(dev).unwrap();
        let thread = ns.spawn(move || {
            // SAFETY: plain socket calls on a descriptor we own and close; the address structs are zeroed
            // and sized for their type; the receive buffer outlives each call.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
                assert!(sll.sll_ifindex > 0, "if_nametoindex");
                let r = libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                // A large receive buffer (root may exceed rmem_max): bulk transfers must not be dropped
                // by the capture on a busy machine.
                let rcvbuf: libc::c_int = 32 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&rcvbuf as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
                let _ = ready_tx.send(());
                let mut buf = vec![0u8; 65536];
                while !s.load(Ordering::Relaxed) {
                    let mut from: libc::sockaddr_ll = std::mem::zeroed();
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    let n = libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    );
                    if n > 0 {
                        f.lock()
                            .unwrap()
                            .push((from.sll_pkttype, buf[..n as usize].to_vec()));
                    }
                }
                libc::close(fd);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("sniffer bound");
        Sniffer {
            stop,
            frames,
            thread: Some(thread),
        }
    }

    /// The frames captured so far (pkttype, bytes).
    pub fn frames(&self) -> Vec<(u8, Vec<u8>)> {
        self.frames.lock().unwrap().clone()
    }

    /// Forgets the frames captured so far.
    pub fn clear(&self) {
        self.frames.lock().unwrap().clear();
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends raw Ethernet frames out of `dev` in `ns` (an AF_PACKET socket), `gap` apart.
pub fn inject(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>, gap: Duration) {
    let dev = std::ffi::CString::new(dev).unwrap();
    ns.spawn(move || {
        // SAFETY: plain socket calls on a descriptor we own and close; the address struct is zeroed and
        // sized for sockaddr_ll.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
            sll.sll_halen = 6;
            for f in &frames {
                sll.sll_addr[..6].copy_from_slice(&f[..6]);
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
                std::thread::sleep(gap);
            }
            libc::close(fd);
        }
    })
    .join()
    .expect("injector thread")
    .expect("netns");
}

// ---- the recorded session and answers, for the prober tests ----

/// The client's datagrams to the tunnel port since `sniff` started (start it before the daemons to get
/// the session's first one),
/// after one more request through the tunnel.
pub fn record(t: &Tunnel, sniff: Sniffer) -> Vec<Vec<u8>> {
    t.probe(ClientPorts::MAIN.fwd_http)
        .expect("request through the tunnel");
    std::thread::sleep(Duration::from_millis(200));
    let server = t.net.server_addr();
    let client = t.net.client_ip;
    let got: Vec<Vec<u8>> = sniff
        .frames()
        .into_iter()
        .filter(|(kind, f)| {
            *kind == PACKET_OUTGOING
                && parse4(f)
                    .is_some_and(|p| p.src.ip() == client && p.dst == server && p.payload_len > 0)
        })
        .map(|(_, f)| f)
        .collect();
    assert!(!got.is_empty(), "no client datagram recorded");
    got
}

/// Frames the server sent to `dst_ip` (captured on the client's interface) since `sniff` started.
pub fn answers_to(sniff: &Sniffer, server: Ipv4Addr, dst_ip: Ipv4Addr) -> Vec<Vec<u8>> {
    sniff
        .frames()
        .into_iter()
        .filter(|(kind, f)| {
            *kind != PACKET_OUTGOING
                && parse4(f).is_some_and(|p| p.src.ip() == server && p.dst.ip() == dst_ip)
        })
        .map(|(_, f)| f)
        .collect()
}

/// `frames` with `f` applied to each one's TCP payload (from the client's own address and `port`).
pub fn mutated(frames: &[Vec<u8>], src: SocketAddr, f: impl Fn(&mut [u8])) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|fr| {
            let mut x = resourced(fr, src);
            let p = parse4(&x).unwrap();
            f(&mut x[p.payload_at..p.payload_at + p.payload_len]);
            let c = tcp4_csum(&x);
            x[50..52].copy_from_slice(&c.to_be_bytes());
            x
        })
        .collect()
}
