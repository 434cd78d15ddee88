//! An L3 link between two namespaces: one tun device (`IFF_TUN | IFF_NO_PI`, ARPHRD_NONE: no link header,
//! no MACs) in each, joined by [`TunRelay`], a thread of this process copying IP packets between the two tun
//! file descriptors. The devices live as long as their descriptors: dropping the relay removes them.
//!
//! This kernel has `tun` but no ipip, gre or wireguard; a tun pair is what a WireGuard or ppp interface
//! looks like to paqet (frames start at the IP header). [`Net::tun`] builds the client/server topology the
//! daemon e2e tests use ([`super::Opts::tun`]).
//!
//! Everything is bounded: the relay polls with a 100 ms timeout, stops on `Drop`, and only moves packets
//! between the test's own namespaces.
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use paqet_testkit::netns::Netns;

use super::{Link, Net};

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETLINK` (`_IOW('T', 205, int)`): sets the ARPHRD type of a (down) tun device.
const TUNSETLINK: libc::c_ulong = 0x4004_54cd;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates tun device `name` (`IFF_TUN | IFF_NO_PI`) inside `ns` and returns its descriptor (non-blocking).
/// The device belongs to the namespace of the thread that issues `TUNSETIFF`, so that happens on a thread
/// inside `ns`. With `arphrd`, the device's link type is changed (`TUNSETLINK`) before it is brought up.
pub fn open_tun(ns: &Netns, name: &str, arphrd: Option<u16>) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("tun name {name:?} must be 1..=15 bytes"),
        ));
    }
    let owned = name.to_owned();
    let fd = ns
        .spawn(move || -> std::io::Result<OwnedFd> {
            // SAFETY: plain open(2) of a NUL-terminated literal path.
            let fd = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("open /dev/net/tun: {e}"),
                ));
            }
            // SAFETY: fresh descriptor, owned from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: ifreq is plain data; the name is NUL-terminated (length checked above) and the flags
            // union member is the one TUNSETIFF reads.
            let r = unsafe {
                let mut ifr: libc::ifreq = std::mem::zeroed();
                for (d, s) in ifr.ifr_name.iter_mut().zip(owned.as_bytes()) {
                    *d = *s as libc::c_char;
                }
                ifr.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
                libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut ifr)
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("TUNSETIFF {owned}: {e}"),
                ));
            }
            if let Some(t) = arphrd {
                // SAFETY: TUNSETLINK takes the ARPHRD type as the integer argument.
                let r =
                    unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETLINK as _, libc::c_ulong::from(t)) };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("TUNSETLINK {owned} {t}: {e}"),
                    ));
                }
            }
            Ok(fd)
        })
        .join()
        .map_err(|_| std::io::Error::other("tun thread panicked"))???;
    ns.exec(&["ip", "link", "set", name, "up"])?;
    Ok(fd)
}

/// Packets the relay moved, per direction.
#[derive(Default, Debug)]
pub struct RelayCounters {
    /// Client tun → server tun.
    pub c2s: AtomicU64,
    /// Server tun → client tun.
    pub s2c: AtomicU64,
}

/// Copies IP packets between two tun descriptors on one thread until dropped.
pub struct TunRelay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<RelayCounters>,
}

/// Most packets moved per direction per poll round (keeps both directions served under load).
const RELAY_BURST: usize = 256;

fn relay_burst(from: RawFd, to: RawFd, buf: &mut [u8], count: &AtomicU64) {
    for _ in 0..RELAY_BURST {
        // SAFETY: valid descriptor; `buf` is writable for its length.
        let n = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // EAGAIN (drained) or an error: either way nothing more to move now.
            return;
        }
        // SAFETY: valid descriptor; the first `n` bytes of `buf` were just read. A failed write (the other
        // device is going away) loses the packet, as a cable would.
        let w = unsafe { libc::write(to, buf.as_ptr().cast(), n as usize) };
        if w == n {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl TunRelay {
    /// Starts relaying between `client` and `server` (both owned by the relay thread from now on).
    pub fn start(client: OwnedFd, server: OwnedFd) -> TunRelay {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(RelayCounters::default());
        let (st, cn) = (stop.clone(), counters.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let (c, s) = (client.as_raw_fd(), server.as_raw_fd());
            while !st.load(Ordering::Relaxed) {
                let mut fds = [
                    libc::pollfd {
                        fd: c,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: s,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: `fds` is a valid array of two pollfds.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                if r <= 0 {
                    continue;
                }
                if fds[0].revents != 0 {
                    relay_burst(c, s, &mut buf, &cn.c2s);
                }
                if fds[1].revents != 0 {
                    relay_burst(s, c, &mut buf, &cn.s2c);
                }
            }
            // `client` and `server` drop here: the tun devices disappear.
            drop((client, server));
        });
        TunRelay {
            stop,
            thread: Some(thread),
            counters,
        }
    }

    /// Packets moved so far (client → server, server → client).
    pub fn moved(&self) -> (u64, u64) {
        (
            self.counters.c2s.load(Ordering::Relaxed),
            self.counters.s2c.load(Ordering::Relaxed),
        )
    }
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Client and server namespaces joined by a tun pair and a [`TunRelay`].
pub struct TunLink {
    // Field order = drop order: the relay (and with it the devices) before the namespaces.
    pub relay: TunRelay,
    pub client: Netns,
    pub server: Netns,
    pub client_if: String,
    pub server_if: String,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
}

impl TunLink {
    /// `tag` (≤ 4 bytes) must be unique per test binary; device names carry the pid.
    pub fn new(tag: &str) -> std::io::Result<TunLink> {
        let pid = std::process::id();
        let client = Netns::new(&format!("{tag}c"))?;
        let server = Netns::new(&format!("{tag}s"))?;
        let (cif, sif) = (format!("t{tag}{pid}c"), format!("t{tag}{pid}s"));
        let cfd = open_tun(&client, &cif, None)?;
        let sfd = open_tun(&server, &sif, None)?;
        let (cip, sip) = (Ipv4Addr::new(10, 217, 0, 1), Ipv4Addr::new(10, 217, 0, 2));
        client.exec(&["ip", "addr", "add", &format!("{cip}/24"), "dev", &cif])?;
        server.exec(&["ip", "addr", "add", &format!("{sip}/24"), "dev", &sif])?;
        Ok(TunLink {
            relay: TunRelay::start(cfd, sfd),
            client,
            server,
            client_if: cif,
            server_if: sif,
            client_ip: cip,
            server_ip: sip,
        })
    }
}

impl Net {
    /// Client and server namespaces joined by a tun pair (no link header, no MACs): the configs built from
    /// this `Net` carry no `router_mac` (empty `*_gw_mac`).
    pub fn tun(tag: &str) -> Net {
        let l = TunLink::new(tag).expect("tun link");
        Net {
            client_if: l.client_if.clone(),
            client_ip: l.client_ip,
            client_gw_mac: String::new(),
            server_if: l.server_if.clone(),
            server_ip: l.server_ip,
            server_gw_mac: String::new(),
            link: Link::Tun(l),
        }
    }

    /// The tun link's relay, when the namespaces are joined by one.
    pub fn tun_relay(&self) -> Option<&TunRelay> {
        match &self.link {
            Link::Tun(l) => Some(&l.relay),
            _ => None,
        }
    }
}

/// Polls `fd` (a non-blocking tun descriptor) for one packet for up to `within`.
pub fn read_packet(fd: &OwnedFd, within: Duration) -> Option<Vec<u8>> {
    let deadline = std::time::Instant::now() + within;
    let mut buf = vec![0u8; 65536];
    while std::time::Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 50) } > 0 {
            // SAFETY: valid descriptor and buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
    }
    None
}

/// Writes one IP packet into the tun descriptor (the kernel receives it on the device).
pub fn write_packet(fd: &OwnedFd, packet: &[u8]) -> std::io::Result<()> {
    // SAFETY: valid descriptor; pointer/len describe `packet`.
    let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
