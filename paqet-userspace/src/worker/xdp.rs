//! The multi-queue XDP data plane: the `paqet-ebpf` program steers tunnel frames into one AF_XDP socket
//! per RX queue, and one worker per queue owns that socket, its sessions, their timers and stream sockets.
//! This module brings the plane up ([`XdpPlane::bring_up`]), does the control thread's share of it
//! ([`XdpPlane::tick`]: counters, guard cookies) and starts a worker's core on its queue
//! ([`start_worker`]); the worker threads, their front ends and shutdown are the daemon assembly's
//! ([`crate::worker::daemon`]), the same code as in pcap mode.
//!
//! Session ownership is a pure function of the frame, so no table is shared between workers:
//! - server: `owner = (fold(peer ip) + peer port) % workers`;
//! - client: `owner = local port % workers` (the session's local port, i.e. the frame's destination port).
//!
//! A server steers frames to its tunnel port. A client steers frames from the server's endpoint
//! (`SteerConfig::FLAG_SRC_*`) to its own session ports only (the program's port bitmap,
//! [`PortSet`](crate::io::steer::PortSet)), so other clients of the same server on this host keep
//! working; it runs all `transport.conn` sessions: they are spread over the workers (worker `i` runs
//! `conn / N` of them, one more for `i < conn % N`), and each worker dials its sessions from local ports it
//! owns ([`Router::client_port`]: `port % N == i`, counting up from one base port: the configured one, or
//! one picked at random at start). Every port the workers will dial is computed at start
//! ([`client_port_plan`]) and put into the bitmap before arming; a dial on a port outside the plan adds it
//! first (under the set's lock, only at dial time).
//!
//! Only one XDP program can be attached per interface: run one XDP daemon per interface (another daemon on
//! the same interface must use pcap mode; with the port bitmap an XDP client and a pcap client coexist).
//!
//! A frame that lands on another worker's queue (veth delivers by sending CPU, not by RSS hash: spike
//! pitfall 7) is copied into the owner's [`Mailbox`], a bounded lock-free queue with recycled buffers, and
//! the owner is woken through an eventfd once per RX batch. Such frames are counted as
//! [`DaemonStats::rx_cross_worker`](super::DaemonStats::rx_cross_worker) by the receiver.
//!
//! Order of operations (spike pitfall 9): attach disarmed → open and register every queue's socket → arm
//! → start the workers. On exit the workers stop first, then the [`XdpPlane`] is dropped (detached).
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use crossbeam_queue::ArrayQueue;
use paqet_common::{SteerConfig, XdpCounter, GUARD_PREFIX_LEN};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, info, warn};

use super::core::{drive, unix_now, Core, Shared};
use super::guard::{Guard, GuardBind, GuardFormat, ProbeResponse};
use super::{Tunnel, WorkerConfig};
use crate::doctor::ethtool::Ethtool;
use crate::io::afxdp::{AfXdpConfig, AfXdpIo};
use crate::io::steer::{guard_prefixes, SharedPorts, Steering, XdpAttach, XdpMode, COUNTERS};
use crate::io::PacketIo;
use crate::ops::hub::MetricsHub;
use crate::proto::session::Role;

/// Frames each mailbox holds before hand-offs to it are dropped (counted).
pub const MAILBOX_FRAMES: usize = 4096;
/// Largest frame handed between workers (an AF_XDP frame is at most 4096 bytes).
const HANDOFF_FRAME: usize = 4096;
/// Frames a worker takes from its mailbox before yielding to its other tasks.
const HANDOFF_BATCH: usize = 64;
/// Lowest local port [`Router::client_port`] hands out (it wraps around to here after 65535).
pub const CLIENT_PORT_MIN: u16 = 1024;
/// Random client base ports are drawn from `32768..=CLIENT_BASE_MAX`, leaving room above for the
/// sessions' ports (`transport.conn` plus the worker count) before wrapping.
const CLIENT_BASE_MAX: u16 = 65535 - 4096;

/// Which XDP attach mode the caller wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpWant {
    /// Native (driver) mode, falling back to generic mode.
    Auto,
    /// Native mode only: fail if the driver cannot run XDP.
    Native,
    /// Generic (SKB) mode only.
    Generic,
}

// ----------------------------------------------------------------------------------------------------
// Cross-worker hand-off
// ----------------------------------------------------------------------------------------------------

/// One worker's inbox: frames other workers received for its sessions. Lock-free (bounded array
/// queues); buffers travel back through `free`, so steady state allocates nothing.
pub struct Mailbox {
    queue: ArrayQueue<Vec<u8>>,
    free: ArrayQueue<Vec<u8>>,
    /// Non-blocking eventfd the owner polls; written once per sender batch.
    wake: OwnedFd,
}

impl Mailbox {
    /// A mailbox for `frames` frames.
    pub fn new(frames: usize) -> std::io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is checked and owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("eventfd for a worker mailbox: {e}"),
            ));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Mailbox {
            queue: ArrayQueue::new(frames.max(1)),
            free: ArrayQueue::new(frames.max(1)),
            wake,
        })
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. EAGAIN (counter saturated) only means
        // the owner is already signalled.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear_signal(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// A worker's view of every mailbox: decides the owner of a frame and hands frames over.
pub struct Router {
    index: usize,
    boxes: Arc<[Mailbox]>,
    /// Owners that got frames since the last [`Router::wake_owners`].
    pending: Vec<bool>,
    any_pending: bool,
    /// Client: the XDP program's session port set; ports handed out by [`Router::client_port`] are added
    /// to it (a no-op for the ports planned at start).
    ports: Option<SharedPorts>,
}

/// Adds up an address's bytes (the server-side owner hash; cheap and deterministic).
fn fold_ip(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => v4.octets().iter().map(|&b| u32::from(b)).sum(),
        IpAddr::V6(v6) => v6.octets().iter().map(|&b| u32::from(b)).sum(),
    }
}

/// The worker owning a frame (see the module docs). `workers` ≥ 1.
pub fn owner_of(role: Role, src: SocketAddr, dst_port: u16, workers: usize) -> usize {
    let n = workers.max(1) as u32;
    let h = match role {
        Role::Server => fold_ip(src.ip()).wrapping_add(u32::from(src.port())),
        Role::Client => u32::from(dst_port),
    };
    (h % n) as usize
}

/// [`Router::client_port`] for worker `index` of `workers`.
pub fn client_port_for(
    index: usize,
    workers: usize,
    base: u16,
    busy: impl Fn(u16) -> bool,
) -> Option<u16> {
    let n = workers.max(1) as u32;
    let want = index as u32 % n;
    let base = base.max(CLIENT_PORT_MIN);
    let owned = |p: &u16| u32::from(*p) % n == want;
    (base..=u16::MAX)
        .chain(CLIENT_PORT_MIN..base)
        .filter(owned)
        .find(|&p| !busy(p))
}

/// The local ports each worker's client sessions will be dialled from, indexed by worker: exactly the
/// ports [`Router::client_port`] hands out when worker `i` dials its [`client_slots`] sessions one after
/// the other (each dial sees the previous ones busy), and which re-dials reuse (a dead session frees its
/// port, the lowest free one of the plan). A worker with no free owned port gets fewer ports.
pub fn client_port_plan(conn: usize, workers: usize, base: u16) -> Vec<Vec<u16>> {
    let n = workers.max(1);
    (0..n)
        .map(|i| {
            let mut ports: Vec<u16> = Vec::with_capacity(client_slots(conn, n, i));
            for _ in 0..client_slots(conn, n, i) {
                match client_port_for(i, n, base, |p| ports.contains(&p)) {
                    Some(p) => ports.push(p),
                    None => break,
                }
            }
            ports
        })
        .collect()
}

/// How many of `conn` client sessions worker `index` of `workers` runs (spread evenly, the first
/// `conn % workers` workers running one more).
pub fn client_slots(conn: usize, workers: usize, index: usize) -> usize {
    let n = workers.max(1);
    conn / n + usize::from(index < conn % n)
}

impl Router {
    /// Routers for `boxes.len()` workers, one per worker index.
    pub fn for_workers(boxes: Arc<[Mailbox]>) -> Vec<Router> {
        (0..boxes.len())
            .map(|index| Router {
                index,
                boxes: boxes.clone(),
                pending: vec![false; boxes.len()],
                any_pending: false,
                ports: None,
            })
            .collect()
    }

    /// Client: makes [`Router::client_port`] add the ports it hands out to `ports` (the XDP program's
    /// session port set), so frames to them are steered.
    pub fn set_port_set(&mut self, ports: SharedPorts) {
        self.ports = Some(ports);
    }

    /// This worker's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.boxes.len()
    }

    /// The worker that owns a frame from `src` to local port `dst_port`.
    pub fn owner(&self, role: Role, src: SocketAddr, dst_port: u16) -> usize {
        owner_of(role, src, dst_port, self.boxes.len())
    }

    /// Client: the local port for a new session of this worker: the first port counting up from `base`
    /// (wrapping from 65535 to [`CLIENT_PORT_MIN`]) that this worker owns (`port % workers == index`) and
    /// for which `busy` is false. `None` when every such port is busy, or when the port cannot be added to
    /// the XDP program's session port set (logged). Called at dial time only: it may take the port set's
    /// lock (uncontended; planned ports are already in the set and only checked).
    pub fn client_port(&self, base: u16, busy: impl Fn(u16) -> bool) -> Option<u16> {
        let port = client_port_for(self.index, self.boxes.len(), base, busy)?;
        if let Some(ports) = &self.ports {
            let added = match ports.lock() {
                Ok(mut set) => set.insert(port),
                Err(_) => Err(crate::io::steer::SteerError::PortsPoisoned),
            };
            match added {
                Ok(false) => {}
                Ok(true) => info!(
                    worker = self.index,
                    port, "session port outside the start plan added to XDP steering"
                ),
                Err(e) => {
                    warn!(worker = self.index, port, error = %e, "cannot steer a new session port; not dialling on it");
                    return None;
                }
            }
        }
        Some(port)
    }

    /// Copies `frame` into `owner`'s mailbox; false if it is full (or the frame too long).
    pub fn hand_to(&mut self, owner: usize, frame: &[u8]) -> bool {
        let Some(mb) = self.boxes.get(owner) else {
            return false;
        };
        if frame.len() > HANDOFF_FRAME {
            return false;
        }
        let mut buf = mb
            .free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(HANDOFF_FRAME));
        buf.clear();
        buf.extend_from_slice(frame);
        if mb.queue.push(buf).is_err() {
            return false;
        }
        self.pending[owner] = true;
        self.any_pending = true;
        true
    }

    /// Wakes every owner that got frames since the last call (once per RX batch).
    pub fn wake_owners(&mut self) {
        if !self.any_pending {
            return;
        }
        self.any_pending = false;
        for (i, p) in self.pending.iter_mut().enumerate() {
            if std::mem::take(p) {
                self.boxes[i].signal();
            }
        }
    }

    /// Hands up to one batch of this worker's mailbox frames to `f`; returns how many.
    pub fn drain_inbox(&mut self, f: &mut dyn FnMut(&mut [u8])) -> usize {
        let mb = &self.boxes[self.index];
        let mut n = 0;
        while n < HANDOFF_BATCH {
            let Some(mut buf) = mb.queue.pop() else { break };
            f(&mut buf);
            let _ = mb.free.push(buf);
            n += 1;
        }
        n
    }

    /// Clears the wake-up signal (call before draining, so a later hand-off signals again).
    fn clear_signal(&self) {
        self.boxes[self.index].clear_signal();
    }

    fn wake_fd(&self) -> RawFd {
        self.boxes[self.index].wake.as_raw_fd()
    }
}

// ----------------------------------------------------------------------------------------------------
// Host helpers
// ----------------------------------------------------------------------------------------------------

/// Number of RX queues of `iface`: the ethtool channel count (rx + combined,
/// [`Ethtool::channels`](crate::doctor::ethtool::Ethtool::channels)), which works in the calling thread's
/// network namespace; else the `rx-*` entries under /sys/class/net/IF/queues (sysfs shows the namespace it
/// was mounted in). At least 1.
pub fn rx_queue_count(iface: &str) -> std::io::Result<usize> {
    match Ethtool::new(iface).and_then(|e| e.channels()) {
        Ok(c) if c.rx_queues() > 0 => return Ok(c.rx_queues() as usize),
        Ok(_) => {}
        Err(e) => debug!(iface, error = %e, "ethtool channels failed; reading sysfs"),
    }
    let dir = format!("/sys/class/net/{iface}/queues");
    let n = std::fs::read_dir(&dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{dir}: {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|s| s.starts_with("rx-")))
        .count();
    Ok(n.max(1))
}

/// The steering config for a worker configuration, on the configured families and local addresses: a
/// server steers its tunnel port; a client steers every frame from `server.addr` to its session ports (with
/// several servers: every frame to its session ports, `FLAG_SRC_ANY`).
pub fn steer_config(wcfg: &WorkerConfig) -> SteerConfig {
    let mut sc = SteerConfig::any(wcfg.local_port());
    sc.flags = 0;
    if wcfg.role == Role::Client {
        sc.port = 0;
        if wcfg.servers.len() > 1 {
            // Several servers: the session ports alone (the bitmap) select our frames.
            sc.flags |= SteerConfig::FLAG_SRC_ANY;
        } else if let Some(server) = wcfg.server_addr {
            sc.src_port = server.port();
            match server.ip() {
                IpAddr::V4(ip) => {
                    sc.flags |= SteerConfig::FLAG_SRC_IPV4;
                    sc.src_ipv4 = ip.octets();
                }
                IpAddr::V6(ip) => {
                    sc.flags |= SteerConfig::FLAG_SRC_IPV6;
                    sc.src_ipv6 = ip.octets();
                }
            }
        }
    }
    if let Some(f) = wcfg.ipv4 {
        sc.flags |= SteerConfig::FLAG_IPV4;
        if let IpAddr::V4(ip) = f.addr.ip() {
            if !ip.is_unspecified() {
                sc.flags |= SteerConfig::FLAG_IPV4_ADDR;
                sc.ipv4 = ip.octets();
            }
        }
    }
    if let Some(f) = wcfg.ipv6 {
        sc.flags |= SteerConfig::FLAG_IPV6;
        if let IpAddr::V6(ip) = f.addr.ip() {
            if !ip.is_unspecified() {
                sc.flags |= SteerConfig::FLAG_IPV6_ADDR;
                sc.ipv6 = ip.octets();
            }
        }
    }
    if let Some((g, _)) = &wcfg.guard {
        sc.flags |= SteerConfig::FLAG_GUARD;
        sc.guard_magic = g.magic;
        if g.format == GuardFormat::Tag {
            // The key itself is derived (PBKDF2) once in `XdpPlane::bring_up`.
            sc.flags |= SteerConfig::FLAG_GUARD_TAG;
            sc.flags |= match g.bind {
                GuardBind::Port => SteerConfig::FLAG_BIND_PORT,
                GuardBind::FourTuple => SteerConfig::FLAG_BIND_4TUPLE,
                GuardBind::None => 0,
            };
        }
    }
    if wcfg.probe_response == ProbeResponse::Closed {
        sc.flags |= SteerConfig::FLAG_PROBE_CLOSED;
    }
    sc
}

/// The TTL (IPv4) and hop limit (IPv6) this host's stack puts on the RST of a closed port: the network
/// namespace's `net.ipv4.ip_default_ttl` and the interface's `net.ipv6.conf.<iface>.hop_limit` (64
/// when unreadable, the kernel's default).
pub fn host_ttls(iface: &str) -> (u8, u8) {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<u8>().ok())
            .filter(|v| *v > 0)
            .unwrap_or(64)
    };
    (
        read("/proc/sys/net/ipv4/ip_default_ttl"),
        read(&format!("/proc/sys/net/ipv6/conf/{iface}/hop_limit")),
    )
}

// ----------------------------------------------------------------------------------------------------
// Bring-up and the control thread's share
// ----------------------------------------------------------------------------------------------------

/// The XDP data plane of a running daemon, kept by its control thread: the attached, armed program and
/// the guard. Dropping it detaches the program (after the workers, which own the sockets, stopped).
pub struct XdpPlane {
    steering: Steering,
    guard: Option<Guard>,
    guard_warn: GuardDropWarn,
    wcfg: WorkerConfig,
}

/// One XDP worker's share of the plane: its RX queue's AF_XDP socket, its router, and how many client
/// sessions it runs.
pub struct XdpLinks {
    io: AfXdpIo,
    router: Router,
    /// Client sessions this worker dials (0 on a server).
    pub slots: usize,
}

impl XdpPlane {
    /// Brings the XDP data plane up on `iface` in the order spike pitfall 9 asks for: attach the program
    /// disarmed (mode `want`), open and register one AF_XDP socket per RX queue, write the guard cookies and
    /// (client) the planned session ports, arm. On a client, sets the sessions' base local port in `wcfg`
    /// (the configured one, or one picked at random). Returns the plane and every queue's worker share.
    /// Errors: the program cannot attach in the wanted mode (with the reason), or a socket cannot be opened;
    /// the program is detached then.
    pub fn bring_up(
        iface: &str,
        want: XdpWant,
        wcfg: &mut WorkerConfig,
    ) -> anyhow::Result<(XdpPlane, Vec<XdpLinks>)> {
        let role = wcfg.role;
        if role == Role::Client {
            // The base of the sessions' local ports (each worker counts up from it to ports it owns).
            let port = match wcfg.local_port() {
                0 => rand::Rng::gen_range(&mut rand::thread_rng(), 32768..=CLIENT_BASE_MAX),
                p => p,
            };
            for f in [wcfg.ipv4.as_mut(), wcfg.ipv6.as_mut()]
                .into_iter()
                .flatten()
            {
                f.addr.set_port(port);
            }
        }
        // The guard first: the tag key goes into the steering config (one PBKDF2 derivation).
        let guard = wcfg
            .guard
            .as_ref()
            .map(|(g, key)| Guard::new(g.clone(), key));
        let mut sc = steer_config(wcfg);
        if let Some(g) = guard.as_ref() {
            sc.tag_key = g.tag_key();
        }
        (sc.ttl, sc.hop_limit) = host_ttls(iface);
        let mut steering = match want {
            XdpWant::Auto => Steering::attach_auto(iface, sc).map(|(s, _)| s),
            XdpWant::Native => Steering::attach(iface, XdpMode::Native, sc),
            XdpWant::Generic => Steering::attach(iface, XdpMode::Generic, sc),
        }
        .with_context(|| format!("XDP data plane on {iface}"))?;
        info!(iface, mode = %steering.attached(), port = sc.port, src_port = sc.src_port, "XDP program attached");

        let queues = rx_queue_count(iface).with_context(|| format!("RX queues of {iface}"))?;
        let mut socks = Vec::with_capacity(queues);
        for q in 0..queues {
            let io = AfXdpIo::open(AfXdpConfig::new(iface, q as u32))
                .with_context(|| format!("AF_XDP socket on {iface} queue {q}"))?;
            steering
                .register_socket(q as u32, &io)
                .with_context(|| format!("registering {iface} queue {q}"))?;
            socks.push(io);
        }
        // Guard cookies before arming, so valid frames are never dropped at start.
        let mut plane = XdpPlane {
            steering,
            guard,
            guard_warn: GuardDropWarn::default(),
            wcfg: wcfg.clone(),
        };
        plane.rotate_guard()?;
        let boxes: Vec<Mailbox> = (0..queues)
            .map(|_| Mailbox::new(MAILBOX_FRAMES))
            .collect::<std::io::Result<_>>()?;
        let mut routers = Router::for_workers(boxes.into());
        if role == Role::Client {
            // Session ports before arming: only frames from the server to these ports are steered.
            let plan = client_port_plan(wcfg.conn, queues, wcfg.local_port());
            plane
                .steering
                .add_ports(plan.iter().flatten().copied())
                .context("writing the session ports into the XDP program")?;
            let ports = plane.steering.port_set();
            for r in &mut routers {
                r.set_port_set(ports.clone());
            }
            info!(conn = wcfg.conn, workers = queues, base_port = wcfg.local_port(), ports = ?plan, "client sessions spread over the workers");
        }
        plane.steering.arm().context("arming the XDP program")?;
        let links = socks
            .into_iter()
            .zip(routers)
            .enumerate()
            .map(|(i, (io, router))| XdpLinks {
                io,
                router,
                slots: match role {
                    Role::Client => client_slots(wcfg.conn, queues, i),
                    Role::Server => 0,
                },
            })
            .collect();
        Ok((plane, links))
    }

    /// The mode the program was attached in.
    pub fn attached(&self) -> XdpAttach {
        self.steering.attached()
    }

    /// The control thread's periodic work: the program's log records, its counters into `hub` (and a
    /// warning when the guard drops frames), guard cookie rotation.
    pub fn tick(&mut self, hub: &MetricsHub) -> anyhow::Result<()> {
        self.steering.flush_logs();
        match self.steering.counters() {
            Ok(c) => {
                hub.set_xdp(c);
                self.guard_warn.observe(
                    c[XdpCounter::GuardDropped as usize],
                    std::time::Instant::now(),
                );
            }
            Err(e) => debug!(error = %e, "reading the XDP counters failed"),
        }
        self.rotate_guard()
    }

    /// The program's counters now (zeros when they cannot be read), after forwarding its last log records.
    pub fn counters(&mut self) -> [u64; COUNTERS] {
        self.steering.flush_logs();
        self.steering.counters().unwrap_or([0; COUNTERS])
    }

    /// Writes the guard prefixes valid around now into the program's table.
    fn rotate_guard(&mut self) -> anyhow::Result<()> {
        let (Some(g), Some((gc, _))) = (self.guard.as_mut(), &self.wcfg.guard) else {
            return Ok(());
        };
        if gc.format != GuardFormat::Cookie {
            // The tag is checked with the key in the steering config: no table to rotate.
            return Ok(());
        }
        let prefixes = guard_prefixes(
            unix_now().as_secs(),
            gc.window_secs,
            gc.skew,
            |t, out: &mut [u8; GUARD_PREFIX_LEN]| g.write_cookie(t, out),
        );
        self.steering
            .set_guard_cookies(&prefixes)
            .context("rotating the XDP guard cookies")
    }
}

/// Warns when the XDP program drops frames for a bad guard cookie: those never reach userspace, so the
/// workers' "failed the guard/crypto check" warnings cannot name them. At most one warning per
/// [`GuardDropWarn::EVERY`], the first as soon as drops start.
#[derive(Debug, Default)]
struct GuardDropWarn {
    /// Counter value at the last warning.
    reported: u64,
    last: Option<std::time::Instant>,
}

impl GuardDropWarn {
    const EVERY: Duration = Duration::from_secs(30);

    /// Feeds the program's current `guard_dropped` total; returns the number of new drops when it warned.
    fn observe(&mut self, total: u64, now: std::time::Instant) -> Option<u64> {
        let new = total.checked_sub(self.reported).filter(|&n| n > 0)?;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            return None;
        }
        self.last = Some(now);
        self.reported = total;
        warn!(
            dropped = new,
            total,
            "{new} frames to the tunnel failed the guard check in the XDP program (dropped before userspace): \
             a peer using another transport.kcp.key, transport.kcp.guard on at one end only, another \
             guard_format or guard_bind, guard_bind = \"4tuple\" through a NAT? (or a flood, or probes)"
        );
        Some(new)
    }
}

// ----------------------------------------------------------------------------------------------------
// Workers
// ----------------------------------------------------------------------------------------------------

/// Starts an XDP worker's core on the current `LocalSet` (the worker thread of
/// [`crate::worker::daemon`]): its queue socket as the one shared link, the router, the RX task and, on a
/// client, its `links.slots` sessions. Returns the core and, on a client, the tunnel for the front ends.
pub fn start_worker(
    wcfg: WorkerConfig,
    links: XdpLinks,
) -> anyhow::Result<(Shared, Option<Tunnel>)> {
    let XdpLinks { io, router, slots } = links;
    let role = wcfg.role;
    let shared = Core::new(wcfg)?;
    tokio::task::spawn_local(drive(shared.clone()));
    let inbox_fd = router.wake_fd();
    shared.borrow_mut().set_router(router);
    let io: Box<dyn PacketIo> = Box::new(io);
    let (link, fd) = match role {
        Role::Server => super::server::start_shared(&shared, io)?,
        Role::Client => {
            let (link, fd, _retire) = shared.borrow_mut().add_shared_link(io, 0, None, None);
            (link, fd)
        }
    };
    let fd = fd.ok_or_else(|| anyhow!("the AF_XDP backend has no readiness descriptor"))?;
    tokio::task::spawn_local(shared_rx(shared.clone(), link, fd, inbox_fd));
    let tunnel = match role {
        Role::Client => {
            super::client::start_shared(&shared, link, slots)?;
            Some(Tunnel::new(shared.clone()))
        }
        Role::Server => None,
    };
    Ok((shared, tunnel))
}

/// The RX task of a worker's queue socket and mailbox.
async fn shared_rx(shared: Shared, link: u64, fd: RawFd, inbox_fd: RawFd) {
    if let Err(e) = shared_rx_loop(&shared, link, fd, inbox_fd).await {
        warn!(error = %e, "XDP worker receive failed; link stopped");
    }
}

/// A raw fd that tokio's reactor watches (the owner keeps it open for the worker's lifetime).
struct Watched(RawFd);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

async fn shared_rx_loop(
    shared: &Shared,
    link: u64,
    fd: RawFd,
    inbox_fd: RawFd,
) -> std::io::Result<()> {
    // SAFETY (both): the socket lives in the core's link table and the eventfd in the router's mailbox
    // until the worker's runtime is dropped, which drops this task (and the registrations) first.
    let xsk = unsafe { AsyncFd::register_with_interest(Watched(fd), Interest::READABLE)? };
    let inbox = unsafe { AsyncFd::register_with_interest(Watched(inbox_fd), Interest::READABLE)? };
    loop {
        tokio::select! {
            g = xsk.readable() => {
                let mut g = g?;
                loop {
                    let n = shared.borrow_mut().rx_link(link)?;
                    if n == 0 {
                        g.clear_ready();
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
            g = inbox.readable() => {
                let mut g = g?;
                g.clear_ready();
                if let Some(r) = shared.borrow().router.as_ref() {
                    r.clear_signal();
                }
                while shared.borrow_mut().rx_handoff(link) > 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_owner_spreads_ports_and_is_deterministic() {
        let ip = IpAddr::from([10, 0, 0, 7]);
        let a = owner_of(Role::Server, SocketAddr::new(ip, 40000), 9999, 2);
        let b = owner_of(Role::Server, SocketAddr::new(ip, 40001), 9999, 2);
        assert_ne!(
            a, b,
            "consecutive client ports must land on different workers of 2"
        );
        assert_eq!(
            a,
            owner_of(Role::Server, SocketAddr::new(ip, 40000), 1, 2),
            "dst port is irrelevant"
        );
        assert_eq!(
            owner_of(Role::Server, SocketAddr::new(ip, 40000), 9999, 1),
            0
        );
    }

    #[test]
    fn client_owner_is_the_local_port_residue() {
        let s: SocketAddr = "10.0.0.1:9999".parse().unwrap();
        assert_eq!(owner_of(Role::Client, s, 40001, 4), 1);
        assert_eq!(owner_of(Role::Client, s, 40004, 4), 0);
    }

    #[test]
    fn client_ports_are_owned_by_their_worker_and_skip_busy_ones() {
        // Worker 1 of 2 from base 40000: odd ports counting up.
        assert_eq!(client_port_for(1, 2, 40000, |_| false), Some(40001));
        assert_eq!(client_port_for(0, 2, 40000, |_| false), Some(40000));
        let busy = [40001u16, 40003];
        assert_eq!(
            client_port_for(1, 2, 40000, |p| busy.contains(&p)),
            Some(40005)
        );
        // Every port a worker hands out routes back to it.
        for (i, n) in [(0usize, 1usize), (2, 3), (3, 4), (1, 4)] {
            let p = client_port_for(i, n, 50001, |_| false).unwrap();
            assert_eq!(
                owner_of(Role::Client, "10.0.0.1:9999".parse().unwrap(), p, n),
                i,
                "port {p}"
            );
            assert!(p >= 50001 && p < 50001 + n as u16);
        }
        // Past 65535 the search wraps to CLIENT_PORT_MIN (1024 is even: worker 0 of 2).
        assert_eq!(
            client_port_for(0, 2, 65535, |_| false),
            Some(CLIENT_PORT_MIN)
        );
        assert_eq!(
            client_port_for(1, 2, 65534, |p| p == 65535),
            Some(CLIENT_PORT_MIN + 1)
        );
        // A base below the minimum starts at the minimum; port 0 is never handed out.
        assert_eq!(client_port_for(0, 1, 0, |_| false), Some(CLIENT_PORT_MIN));
        // All owned ports busy: none.
        assert_eq!(client_port_for(0, 2, 40000, |_| true), None);
    }

    #[test]
    fn port_plan_is_what_the_workers_dial() {
        // 5 sessions over 2 workers from 40000: worker 0 dials 3 even ports, worker 1 two odd ones.
        let plan = client_port_plan(5, 2, 40000);
        assert_eq!(plan, vec![vec![40000, 40002, 40004], vec![40001, 40003]]);
        // Replaying the dials (each sees the earlier ones busy) gives exactly the plan, and a re-dial after
        // any one session died reuses its port.
        for (i, ports) in plan.iter().enumerate() {
            let mut live: Vec<u16> = Vec::new();
            for _ in 0..client_slots(5, 2, i) {
                live.push(client_port_for(i, 2, 40000, |p| live.contains(&p)).unwrap());
            }
            assert_eq!(&live, ports);
            for dead in 0..live.len() {
                let mut rest = live.clone();
                let gone = rest.remove(dead);
                assert_eq!(
                    client_port_for(i, 2, 40000, |p| rest.contains(&p)),
                    Some(gone)
                );
            }
        }
        // Wrapping past 65535 and a single worker.
        assert_eq!(
            client_port_plan(3, 1, 65534),
            vec![vec![65534, 65535, CLIENT_PORT_MIN]]
        );
        // More workers than sessions: idle workers dial nothing.
        assert_eq!(
            client_port_plan(1, 3, 50000),
            vec![vec![50001], vec![], vec![]]
        );
    }

    #[test]
    fn guard_drop_warnings_start_at_once_and_are_rate_limited() {
        let t0 = std::time::Instant::now();
        let mut w = GuardDropWarn::default();
        assert_eq!(w.observe(0, t0), None, "no drops, no warning");
        assert_eq!(w.observe(5, t0), Some(5), "the first drops warn at once");
        assert_eq!(
            w.observe(9, t0 + Duration::from_secs(1)),
            None,
            "rate-limited"
        );
        assert_eq!(
            w.observe(12, t0 + GuardDropWarn::EVERY),
            Some(7),
            "counts every drop since the last warning"
        );
        assert_eq!(
            w.observe(12, t0 + 3 * GuardDropWarn::EVERY),
            None,
            "no new drops"
        );
    }

    #[test]
    fn client_slots_spread_conn_over_workers() {
        assert_eq!(
            (0..2).map(|i| client_slots(4, 2, i)).collect::<Vec<_>>(),
            vec![2, 2]
        );
        assert_eq!(
            (0..3).map(|i| client_slots(4, 3, i)).collect::<Vec<_>>(),
            vec![2, 1, 1]
        );
        assert_eq!(
            (0..4).map(|i| client_slots(1, 4, i)).collect::<Vec<_>>(),
            vec![1, 0, 0, 0]
        );
        assert_eq!(client_slots(5, 1, 0), 5);
    }

    #[test]
    fn client_steering_matches_the_server_endpoint_not_a_port() {
        let wcfg = test_wcfg(Role::Client, "10.0.0.1:41000", Some("10.0.0.2:9999"));
        let sc = steer_config(&wcfg);
        assert_eq!(sc.port, 0, "a client steers no destination port");
        assert!(sc.is_armed());
        assert!(sc.has(
            SteerConfig::FLAG_IPV4 | SteerConfig::FLAG_IPV4_ADDR | SteerConfig::FLAG_SRC_IPV4
        ));
        assert!(!sc.has(SteerConfig::FLAG_SRC_IPV6));
        assert_eq!((sc.src_ipv4, sc.src_port), ([10, 0, 0, 2], 9999));
        assert_eq!(sc.ipv4, [10, 0, 0, 1]);
        let srv = steer_config(&test_wcfg(Role::Server, "0.0.0.0:9999", None));
        assert_eq!(srv.port, 9999);
        assert!(srv.has(SteerConfig::FLAG_IPV4) && !srv.has(SteerConfig::FLAG_IPV4_ADDR));
        assert!(!srv.has(SteerConfig::FLAG_SRC_IPV4 | SteerConfig::FLAG_SRC_IPV6));
    }

    fn test_wcfg(role: Role, local: &str, server: Option<&str>) -> WorkerConfig {
        use crate::proto::kcp::{KcpConfig, KcpMode};
        use crate::proto::session::SessionConfig;
        use crate::proto::smux::SmuxConfig;
        use crate::wire::crypt::{BlockMode, Crypto};
        let session = SessionConfig {
            crypto: Crypto::from_derived(BlockMode::Aes, &[0x42; 32]).expect("crypto"),
            dshard: 0,
            pshard: 0,
            kcp: KcpConfig::preset(KcpMode::Fast3),
            smux: SmuxConfig::default(),
            mtu: 1350,
        };
        WorkerConfig {
            role,
            session,
            local_mac: [2, 0, 0, 0, 0, 1],
            ipv4: Some(super::super::FamilyConfig {
                addr: local.parse().unwrap(),
                router_mac: [2, 0, 0, 0, 0, 2],
            }),
            ipv6: None,
            server_addr: server.map(|s| s.parse().unwrap()),
            servers: Vec::new(),
            conn: 4,
            local_flags: Vec::new(),
            remote_flags: Vec::new(),
            guard: None,
            probe_response: Default::default(),
            limits: Default::default(),
            header_timeout: Duration::from_secs(10),
            rotate: Default::default(),
            reverse: Default::default(),
            targets: Default::default(),
            replay: None,
            noise: None,
        }
    }

    #[test]
    fn mailbox_hands_frames_over_and_recycles_buffers() {
        let boxes: Vec<Mailbox> = (0..2).map(|_| Mailbox::new(2).unwrap()).collect();
        let mut routers = Router::for_workers(boxes.into());
        let mut r1 = routers.pop().unwrap();
        let mut r0 = routers.pop().unwrap();
        assert!(r0.hand_to(1, b"one"));
        assert!(r0.hand_to(1, b"two"));
        assert!(!r0.hand_to(1, b"three"), "a full mailbox refuses");
        assert!(
            !r0.hand_to(1, &vec![0u8; HANDOFF_FRAME + 1]),
            "oversized frames are refused"
        );
        r0.wake_owners();
        // The owner's eventfd is readable now.
        assert!(crate::io::poll_readable(r1.wake_fd(), Duration::ZERO).unwrap());
        r1.clear_signal();
        assert!(!crate::io::poll_readable(r1.wake_fd(), Duration::ZERO).unwrap());
        let mut got = Vec::new();
        assert_eq!(r1.drain_inbox(&mut |f: &mut [u8]| got.push(f.to_vec())), 2);
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(r1.drain_inbox(&mut |_: &mut [u8]| panic!("empty")), 0);
        // The buffers came back to the free list: the next hand-off reuses one.
        assert_eq!(r0.boxes[1].free.len(), 2);
        assert!(r0.hand_to(1, b"four"));
        assert_eq!(r0.boxes[1].free.len(), 1);
    }
}
