//! AF_XDP packet I/O: one socket bound to one RX queue, with its own UMEM, implementing
//! [`PacketIo`]. Pure Rust on top of `xdpilone` (libc only; no libbpf/libxdp).
//!
//! The UMEM is split in two halves: RX frames live in the fill ring / RX ring / the caller's
//! callback, TX frames in a free list / TX ring / completion ring. Every frame is always in exactly
//! one of those places:
//! - RX: frames returned by the RX ring are handed to the callback, then put back into the fill
//!   ring. `xdpilone` reserves fill slots from a cached view of the kernel's consumer index (and
//!   the kernel publishes RX entries slightly before it publishes the fill consumer), so inserts are
//!   looped and leftovers parked in a refill backlog instead of being lost (spike pitfall 6).
//! - TX: [`PacketIo::send_with`] lets the caller write the frame straight into a free UMEM frame,
//!   which is queued on the TX ring; the kernel is kicked (`sendto`) every `tx_batch` frames and on
//!   [`PacketIo::flush`] (copy mode transmits only inside `sendto`; `need_wakeup` is honoured in
//!   zero-copy mode); completed frames are reaped back into the free list.
//!
//! Medium: on an interface without a link header (tun, WireGuard; ARPHRD_NONE), generic XDP hands the
//! program and the socket bare IP packets, and frames sent on the TX ring must be bare IP packets too:
//! [`PacketIo::medium`] reports the interface's medium, read at open.
//!
//! Steering frames into the socket is [`super::steer::Steering`]'s job: register
//! [`AfXdpIo::raw_socket_fd`] for [`AfXdpIo::queue`] there, then arm it.

use std::ffi::CString;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

use super::{poll_readable, IoStats, Medium, PacketIo};

/// Settings of one AF_XDP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AfXdpConfig {
    /// Interface name (resolved in the calling thread's network namespace).
    pub iface: String,
    /// RX queue to bind to.
    pub queue: u32,
    /// UMEM frame size: 2048 or 4096 bytes (aligned chunk mode).
    pub frame_size: u32,
    /// Number of UMEM frames; half serve RX, half TX. At least 64.
    pub frame_count: u32,
    /// Try `XDP_ZEROCOPY` first and fall back to copy mode (for real NICs; veth has no zero-copy).
    pub zero_copy: bool,
    /// Most frames delivered by one [`PacketIo::recv_batch`].
    pub rx_batch: u32,
    /// Kick the kernel after this many queued TX frames (and on [`PacketIo::flush`]).
    pub tx_batch: u32,
}

impl AfXdpConfig {
    /// Defaults: 2048-byte frames × 8192 (a 16 MiB UMEM), copy mode, batches of 64 RX / 32 TX frames.
    /// 2048 bytes hold every tunnel frame (`transport.kcp.mtu` ≤ 1500 plus Ethernet, IPv6 and TCP with
    /// options, ≤ 1590 bytes); only steered (tunnel) frames ever reach the UMEM. 4096-byte frames doubled
    /// the daemon's RSS (measured 58–63 MiB with 10 idle streams) for nothing.
    pub fn new(iface: impl Into<String>, queue: u32) -> Self {
        AfXdpConfig {
            iface: iface.into(),
            queue,
            frame_size: 2048,
            frame_count: 8192,
            zero_copy: false,
            rx_batch: 64,
            tx_batch: 32,
        }
    }
}

/// How the socket ended up bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XskBindMode {
    /// `XDP_ZEROCOPY`: the NIC DMAs straight into the UMEM.
    ZeroCopy,
    /// `XDP_COPY`: the kernel copies frames between skb/xdp buffers and the UMEM.
    Copy,
}

/// Errors opening an AF_XDP socket.
#[derive(Debug, thiserror::Error)]
pub enum AfXdpError {
    /// The configuration is not usable.
    #[error("AF_XDP socket for interface {iface:?} queue {queue}: {what}")]
    Config {
        iface: String,
        queue: u32,
        what: String,
    },
    /// A setup step (mmap, socket, ring setup, bind...) failed.
    #[error("AF_XDP socket for interface {iface:?} queue {queue}: {step} failed: {source}")]
    Setup {
        iface: String,
        queue: u32,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Zero-copy was requested and neither zero-copy nor copy mode could bind.
    #[error("AF_XDP socket for interface {iface:?} queue {queue}: zero-copy bind failed ({zero_copy}) and copy-mode bind failed ({copy})")]
    Bind {
        iface: String,
        queue: u32,
        zero_copy: String,
        copy: String,
    },
}

impl From<AfXdpError> for std::io::Error {
    fn from(e: AfXdpError) -> Self {
        let kind = match &e {
            AfXdpError::Config { .. } => std::io::ErrorKind::InvalidInput,
            AfXdpError::Setup { source, .. } => source.kind(),
            AfXdpError::Bind { .. } => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// The anonymous mapping backing a UMEM.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Area {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: anonymous private mapping, no fd; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(Area { ptr, len })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in `Area::new`; nothing borrows it any more (the
        // rings and sockets using it are dropped before, see the field order of `AfXdpIo`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The xdpilone objects of one bound socket. Field order = drop order.
struct Rings {
    rx: RingRx,
    tx: RingTx,
    dev: DeviceQueue,
    user: User,
    _sock: Socket,
    _umem: Umem,
}

/// Bounded retries when pushing frames back into the fill ring within one call.
const FILL_RETRIES: usize = 64;
/// Bounded kick/reap rounds when waiting for a free TX frame or draining the TX ring.
const TX_RETRIES: usize = 64;

/// An AF_XDP socket on one RX queue. Owned by one worker thread.
pub struct AfXdpIo {
    rings: Rings,
    // Declared after `rings`: the UMEM area outlives the sockets that use it.
    area: Area,
    cfg: AfXdpConfig,
    mode: XskBindMode,
    frame_mask: u64,
    /// Addresses received in the current batch (reused buffer).
    rx_addrs: Vec<u64>,
    /// RX frames not yet back in the fill ring.
    refill: Vec<u64>,
    /// TX frames owned by us and free to fill.
    tx_free: Vec<u64>,
    /// TX frames queued on the TX ring or in flight, not yet completed.
    tx_outstanding: u32,
    /// TX frames queued since the last kick.
    tx_unkicked: u32,
    /// RX descriptors pointing outside the UMEM (ignored; should never happen).
    rx_bad_desc: u64,
    /// What frames start with on this interface (from its ARPHRD type).
    medium: Medium,
    stats: IoStats,
}

// SAFETY: `AfXdpIo` exclusively owns its UMEM mapping and rings (raw pointers into memory shared
// only with the kernel); nothing is shared with other threads, so moving it to another thread is
// sound. It is not `Sync`.
unsafe impl Send for AfXdpIo {}

fn errno(e: xdpilone::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.get_raw().abs())
}

impl AfXdpIo {
    /// Creates the UMEM, binds a socket to `cfg.queue` of `cfg.iface` (zero-copy first when
    /// `cfg.zero_copy`, else copy mode, always with `XDP_USE_NEED_WAKEUP`) and fills the fill ring.
    pub fn open(cfg: AfXdpConfig) -> Result<Self, AfXdpError> {
        let conf_err = |what: String| AfXdpError::Config {
            iface: cfg.iface.clone(),
            queue: cfg.queue,
            what,
        };
        if cfg.frame_size != 2048 && cfg.frame_size != 4096 {
            return Err(conf_err(format!(
                "frame_size {} must be 2048 or 4096",
                cfg.frame_size
            )));
        }
        if cfg.frame_count < 64 || cfg.frame_count > (1 << 20) {
            return Err(conf_err(format!(
                "frame_count {} must be in 64..=1048576",
                cfg.frame_count
            )));
        }
        if cfg.rx_batch == 0 || cfg.tx_batch == 0 {
            return Err(conf_err("rx_batch and tx_batch must be at least 1".into()));
        }
        let c_iface = CString::new(cfg.iface.as_str())
            .map_err(|_| conf_err("interface name contains a NUL byte".into()))?;
        let medium = super::route::link_medium(&cfg.iface).map_err(|e| AfXdpError::Setup {
            iface: cfg.iface.clone(),
            queue: cfg.queue,
            step: "reading the interface's link type",
            source: std::io::Error::other(e.to_string()),
        })?;
        let len = cfg.frame_count as usize * cfg.frame_size as usize;
        let area = Area::new(len).map_err(|source| AfXdpError::Setup {
            iface: cfg.iface.clone(),
            queue: cfg.queue,
            step: "mmap of the UMEM",
            source,
        })?;

        let copy_flags = SocketConfig::XDP_BIND_COPY | SocketConfig::XDP_BIND_NEED_WAKEUP;
        let (rings, mode) = if cfg.zero_copy {
            let zc_flags = SocketConfig::XDP_BIND_ZEROCOPY | SocketConfig::XDP_BIND_NEED_WAKEUP;
            match bind_rings(&cfg, &c_iface, &area, zc_flags) {
                Ok(r) => (r, XskBindMode::ZeroCopy),
                Err((step, zc)) => {
                    tracing::info!(iface = %cfg.iface, queue = cfg.queue, step, error = %zc,
                        "AF_XDP zero-copy bind failed; using copy mode");
                    match bind_rings(&cfg, &c_iface, &area, copy_flags) {
                        Ok(r) => (r, XskBindMode::Copy),
                        Err((step2, copy)) => {
                            return Err(AfXdpError::Bind {
                                iface: cfg.iface.clone(),
                                queue: cfg.queue,
                                zero_copy: format!("{step}: {zc}"),
                                copy: format!("{step2}: {copy}"),
                            })
                        }
                    }
                }
            }
        } else {
            let r = bind_rings(&cfg, &c_iface, &area, copy_flags).map_err(|(step, source)| {
                AfXdpError::Setup {
                    iface: cfg.iface.clone(),
                    queue: cfg.queue,
                    step,
                    source,
                }
            })?;
            (r, XskBindMode::Copy)
        };

        let fs = u64::from(cfg.frame_size);
        let rx_frames = u64::from(cfg.frame_count / 2);
        let mut io = AfXdpIo {
            rings,
            area,
            mode,
            frame_mask: !(fs - 1),
            rx_addrs: Vec::with_capacity(cfg.rx_batch as usize),
            refill: (0..rx_frames).map(|i| i * fs).collect(),
            tx_free: (rx_frames..u64::from(cfg.frame_count))
                .map(|i| i * fs)
                .collect(),
            tx_outstanding: 0,
            tx_unkicked: 0,
            rx_bad_desc: 0,
            medium,
            stats: IoStats::default(),
            cfg,
        };
        io.refill_fill_ring();
        if !io.refill.is_empty() {
            return Err(AfXdpError::Setup {
                iface: io.cfg.iface.clone(),
                queue: io.cfg.queue,
                step: "initial fill of the fill ring",
                source: std::io::Error::other(format!(
                    "{} of {rx_frames} frames did not fit",
                    io.refill.len()
                )),
            });
        }
        tracing::debug!(iface = %io.cfg.iface, queue = io.cfg.queue, mode = ?io.mode,
            frames = io.cfg.frame_count, frame_size = io.cfg.frame_size, medium = %io.medium,
            "AF_XDP socket bound");
        Ok(io)
    }

    /// The configuration the socket was opened with.
    pub fn config(&self) -> &AfXdpConfig {
        &self.cfg
    }

    /// The RX queue this socket is bound to.
    pub fn queue(&self) -> u32 {
        self.cfg.queue
    }

    /// Zero-copy or copy mode.
    pub fn bind_mode(&self) -> XskBindMode {
        self.mode
    }

    /// The AF_XDP socket descriptor (for the XSKMAP and for poll). Owned by `self`: do not close.
    pub fn raw_socket_fd(&self) -> RawFd {
        self.rings.rx.as_raw_fd()
    }

    /// Frames currently parked outside the fill ring (should be 0 between calls under normal load).
    pub fn refill_backlog(&self) -> usize {
        self.refill.len()
    }

    /// TX frames free to fill right now.
    pub fn tx_free_frames(&self) -> usize {
        self.tx_free.len()
    }

    /// Moves RX frames from the backlog into the fill ring; loops because xdpilone reserves from a
    /// cached consumer index that is refreshed only once the cached free count reaches zero.
    fn refill_fill_ring(&mut self) {
        if self.refill.is_empty() {
            return;
        }
        for _ in 0..FILL_RETRIES {
            let put = {
                let mut w = self.rings.dev.fill(self.refill.len() as u32);
                let put = w.insert(self.refill.iter().copied());
                w.commit();
                put as usize
            };
            self.refill.drain(..put);
            // put == 0 means the ring is really full (a reserve of 0 refreshes the consumer
            // index): keep the rest for the next call.
            if self.refill.is_empty() || put == 0 {
                break;
            }
        }
        if self.rings.dev.needs_wakeup() {
            self.rings.dev.wake();
        }
    }

    /// Returns completed TX frames to the free list.
    fn reap_completions(&mut self) {
        if self.tx_outstanding == 0 {
            return;
        }
        let mask = self.frame_mask;
        let mut c = self.rings.dev.complete(self.tx_outstanding);
        while let Some(addr) = c.read() {
            self.tx_free.push(addr & mask);
            self.tx_outstanding -= 1;
        }
        c.release();
    }

    /// Kicks the kernel to transmit what is queued on the TX ring (copy mode: only `sendto` sends;
    /// zero-copy: only when the ring asks for a wakeup), then reaps completions.
    fn kick(&mut self) {
        self.tx_unkicked = 0;
        for _ in 0..TX_RETRIES {
            if self.mode == XskBindMode::Copy || self.rings.tx.needs_wakeup() {
                self.rings.tx.wake();
            }
            self.reap_completions();
            // Copy mode sends a bounded budget per sendto: repeat while descriptors wait.
            if self.rings.tx.pending() == 0 || self.mode == XskBindMode::ZeroCopy {
                break;
            }
        }
    }

    /// Takes a free TX frame, kicking and reaping a bounded number of times if none is free.
    fn take_tx_frame(&mut self) -> Option<u64> {
        if let Some(a) = self.tx_free.pop() {
            return Some(a);
        }
        for _ in 0..TX_RETRIES {
            self.kick();
            if let Some(a) = self.tx_free.pop() {
                return Some(a);
            }
            std::hint::spin_loop();
        }
        None
    }

    fn kernel_stats(&self) -> Option<xdpilone::xdp::XdpStatisticsV2> {
        self.rings.user.statistics_v2().ok()
    }
}

/// Builds and binds the UMEM and socket. On failure returns the failed step and the OS error.
fn bind_rings(
    cfg: &AfXdpConfig,
    iface: &CString,
    area: &Area,
    bind_flags: u16,
) -> Result<Rings, (&'static str, std::io::Error)> {
    let rx_frames = cfg.frame_count / 2;
    let tx_frames = cfg.frame_count - rx_frames;
    let fill_size = rx_frames.next_power_of_two();
    let comp_size = tx_frames.next_power_of_two();
    let ucfg = UmemConfig {
        fill_size,
        complete_size: comp_size,
        frame_size: cfg.frame_size,
        headroom: 0,
        flags: 0,
    };
    let slice = NonNull::slice_from_raw_parts(area.ptr, area.len);
    // SAFETY: `area` is a page-aligned anonymous mapping of `area.len` bytes that outlives the
    // returned `Umem` (AfXdpIo drops `rings` before `area`).
    let umem = unsafe { Umem::new(ucfg, slice) }.map_err(|e| ("UMEM registration", errno(e)))?;
    let mut info = IfInfo::invalid();
    info.from_name(iface)
        .map_err(|e| ("interface lookup", errno(e)))?;
    info.set_queue(cfg.queue);
    let sock = Socket::with_shared(&info, &umem).map_err(|e| ("socket creation", errno(e)))?;
    let dev = umem
        .fq_cq(&sock)
        .map_err(|e| ("fill/completion ring setup", errno(e)))?;
    let user = umem
        .rx_tx(
            &sock,
            &SocketConfig {
                rx_size: NonZeroU32::new(fill_size),
                tx_size: NonZeroU32::new(comp_size),
                bind_flags,
            },
        )
        .map_err(|e| ("RX/TX ring setup", errno(e)))?;
    let rx = user.map_rx().map_err(|e| ("RX ring mmap", errno(e)))?;
    let tx = user.map_tx().map_err(|e| ("TX ring mmap", errno(e)))?;
    umem.bind(&user).map_err(|e| ("bind", errno(e)))?;
    Ok(Rings {
        rx,
        tx,
        dev,
        user,
        _sock: sock,
        _umem: umem,
    })
}

impl PacketIo for AfXdpIo {
    fn recv_batch(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<usize> {
        self.refill_fill_ring();
        if self.tx_outstanding > 0 {
            self.reap_completions();
        }
        if self.rings.rx.available() == 0
            && (timeout.is_zero() || !poll_readable(self.raw_socket_fd(), timeout)?)
        {
            return Ok(0);
        }
        let base = self.area.ptr.as_ptr();
        let area_len = self.area.len as u64;
        let mask = self.frame_mask;
        let mut addrs = std::mem::take(&mut self.rx_addrs);
        addrs.clear();
        let mut delivered = 0usize;
        {
            let mut r = self.rings.rx.receive(self.cfg.rx_batch);
            while let Some(XdpDesc { addr, len, .. }) = r.read() {
                addrs.push(addr & mask);
                let end = addr.checked_add(u64::from(len));
                if end.is_none_or(|end| end > area_len) {
                    self.rx_bad_desc += 1;
                    continue;
                }
                // SAFETY: [addr, addr+len) lies inside the UMEM mapping (checked above); the kernel
                // handed this frame to us through the RX ring and will not write it until we put
                // it back into the fill ring, after the callback returns.
                let frame =
                    unsafe { std::slice::from_raw_parts(base.add(addr as usize), len as usize) };
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += u64::from(len);
                delivered += 1;
                f(frame);
            }
            r.release();
        }
        self.refill.extend_from_slice(&addrs);
        self.rx_addrs = addrs;
        self.refill_fill_ring();
        Ok(delivered)
    }

    fn send_with(
        &mut self,
        max_len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> std::io::Result<()> {
        if max_len > self.cfg.frame_size as usize {
            self.stats.tx_errors += 1;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "frame of up to {max_len} bytes does not fit a {}-byte UMEM frame on {} queue {}",
                    self.cfg.frame_size, self.cfg.iface, self.cfg.queue
                ),
            ));
        }
        self.reap_completions();
        let Some(addr) = self.take_tx_frame() else {
            self.stats.tx_drops += 1;
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "no free AF_XDP TX frame on {} queue {} ({} in flight)",
                    self.cfg.iface, self.cfg.queue, self.tx_outstanding
                ),
            ));
        };
        // SAFETY: `addr` is the start of a TX frame we own (free list), inside the mapping, and
        // max_len <= frame_size; the kernel does not touch it until we queue it below.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(self.area.ptr.as_ptr().add(addr as usize), max_len)
        };
        let len = fill(buf);
        if len > max_len {
            self.tx_free.push(addr);
            self.stats.tx_errors += 1;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("fill returned {len} bytes, more than max_len {max_len}"),
            ));
        }
        if len == 0 {
            self.tx_free.push(addr);
            return Ok(());
        }
        let queued = {
            let mut w = self.rings.tx.transmit(1);
            let ok = w.insert_once(XdpDesc {
                addr,
                len: len as u32,
                options: 0,
            });
            w.commit();
            ok
        };
        if !queued {
            // Cannot happen while the TX ring is at least as large as the TX frame count.
            self.tx_free.push(addr);
            self.stats.tx_errors += 1;
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "AF_XDP TX ring full on {} queue {}",
                    self.cfg.iface, self.cfg.queue
                ),
            ));
        }
        self.tx_outstanding += 1;
        self.tx_unkicked += 1;
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        if self.tx_unkicked >= self.cfg.tx_batch {
            self.kick();
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.tx_unkicked > 0 || self.rings.tx.pending() > 0 {
            self.kick();
        } else {
            self.reap_completions();
        }
        Ok(())
    }

    fn stats(&self) -> IoStats {
        let mut s = self.stats;
        s.xsk_rx_invalid_descs = self.rx_bad_desc;
        if let Some(k) = self.kernel_stats() {
            s.xsk_rx_dropped = k.rx_dropped;
            s.xsk_rx_ring_full = k.rx_ring_full;
            s.xsk_fill_ring_empty = k.rx_fill_ring_empty_descs;
            s.xsk_rx_invalid_descs += k.rx_invalid_descs;
            s.xsk_tx_invalid_descs = k.tx_invalid_descs;
            s.xsk_tx_ring_empty = k.tx_ring_empty_descs;
            s.kernel_drops = k.rx_dropped + k.rx_ring_full;
        }
        s
    }

    fn name(&self) -> &'static str {
        "afxdp"
    }

    fn medium(&self) -> Medium {
        self.medium
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.raw_socket_fd())
    }
}

impl AsRawFd for AfXdpIo {
    fn as_raw_fd(&self) -> RawFd {
        self.raw_socket_fd()
    }
}

impl Drop for AfXdpIo {
    fn drop(&mut self) {
        // Push out what the caller queued but did not flush (best effort).
        if self.tx_unkicked > 0 {
            self.kick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_config_before_touching_the_kernel() {
        let mut c = AfXdpConfig::new("lo", 0);
        c.frame_size = 3000;
        let e = AfXdpIo::open(c)
            .err()
            .expect("frame size 3000 must be rejected");
        assert!(e.to_string().contains("frame_size 3000"), "{e}");
        let mut c = AfXdpConfig::new("lo", 0);
        c.frame_count = 8;
        let e = AfXdpIo::open(c).err().expect("8 frames must be rejected");
        assert!(e.to_string().contains("frame_count 8"), "{e}");
        let c = AfXdpConfig::new("bad\0name", 0);
        let e = AfXdpIo::open(c)
            .err()
            .expect("NUL in name must be rejected");
        assert!(matches!(e, AfXdpError::Config { .. }), "{e}");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn unknown_interface_names_the_step() {
        let e = AfXdpIo::open(AfXdpConfig::new("pqnosuchif0", 0))
            .err()
            .expect("no such interface");
        let t = e.to_string();
        assert!(t.contains("pqnosuchif0"), "{t}");
    }
}
