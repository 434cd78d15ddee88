//! Packet I/O: one trait, several backends (pcap, in-memory; AF_XDP later).
//!
//! - [`PacketIo`] is the batch-oriented interface every backend implements. RX hands out borrowed
//!   frames through a callback (no copy out of the backend's ring); TX lets the caller build a frame
//!   directly inside the backend's buffer ([`PacketIo::send_with`]), which AF_XDP will map to UMEM.
//! - [`pcap`]: libpcap capture + AF_PACKET (or pcap) injection, like upstream paqet.
//! - [`mem`]: an in-memory pair for simulated tests, with seeded loss.
//! - [`route`]: kernel lookups (MAC, addresses, next hop, neighbour MAC, ifindex, MTU) over rtnetlink.
//!
//! Every backend reports the [`Medium`] of its frames ([`PacketIo::medium`]): Ethernet, or bare IP
//! packets on interfaces without a link header (tun, ppp, WireGuard). The worker parses and builds
//! envelopes for that medium.

pub mod afxdp;
pub mod mem;
pub mod pcap;
pub mod route;
pub mod steer;

use std::os::fd::RawFd;
use std::time::Duration;

pub use crate::wire::envelope::Medium;

/// Counters a backend keeps. All are monotonic since the backend was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Frames handed to the RX callback.
    pub rx_frames: u64,
    /// Bytes handed to the RX callback (captured length).
    pub rx_bytes: u64,
    /// Frames accepted for transmission by the kernel / the peer.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames whose transmission failed (the error was returned to the caller).
    pub tx_errors: u64,
    /// Frames dropped before delivery because the TX path was full (e.g. in-memory queue full).
    pub tx_drops: u64,
    /// Frames the kernel dropped because the capture buffer was full (pcap `ps_drop`).
    pub kernel_drops: u64,
    /// Frames dropped by the interface/driver (pcap `ps_ifdrop`).
    pub if_drops: u64,
    /// Frames that arrived longer than the snap length and were truncated.
    pub rx_truncated: u64,
    /// AF_XDP (`XDP_STATISTICS`): frames dropped by the kernel for this socket (`rx_dropped`).
    pub xsk_rx_dropped: u64,
    /// AF_XDP: frames dropped because the RX ring was full (`rx_ring_full`).
    pub xsk_rx_ring_full: u64,
    /// AF_XDP: times the kernel found the fill ring empty (`rx_fill_ring_empty_descs`).
    pub xsk_fill_ring_empty: u64,
    /// AF_XDP: invalid RX descriptors (`rx_invalid_descs`).
    pub xsk_rx_invalid_descs: u64,
    /// AF_XDP: invalid TX descriptors (`tx_invalid_descs`).
    pub xsk_tx_invalid_descs: u64,
    /// AF_XDP: times the kernel found the TX ring empty when woken (`tx_ring_empty_descs`).
    pub xsk_tx_ring_empty: u64,
}

/// A packet-I/O backend. One instance is owned by one worker thread.
pub trait PacketIo: Send {
    /// Receive a batch: waits at most `timeout` for the first frame, then calls `f(frame)` for every
    /// frame available (up to a batch limit). Returns the number of frames delivered (0 on timeout).
    fn recv_batch(&mut self, timeout: Duration, f: &mut dyn FnMut(&[u8]))
        -> std::io::Result<usize>;

    /// Transmit one frame that `fill` writes into a buffer of at least `max_len` bytes. `fill`
    /// returns the frame length (0 = nothing to send). Backends that batch TX may keep the frame
    /// until [`PacketIo::flush`] or until their batch is full.
    fn send_with(
        &mut self,
        max_len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> std::io::Result<()>;

    /// Transmit a ready-made frame (copies it into the backend's TX buffer).
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.send_with(frame.len(), &mut |buf: &mut [u8]| {
            buf[..frame.len()].copy_from_slice(frame);
            frame.len()
        })
    }

    /// Push out any frames a batching backend still holds.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Current counters.
    fn stats(&self) -> IoStats;

    /// Short backend name for logs ("pcap", "mem", ...).
    fn name(&self) -> &'static str;

    /// What the frames of this backend start with: an Ethernet header (default) or the IP header.
    fn medium(&self) -> Medium {
        Medium::Ethernet
    }

    /// A file descriptor that becomes readable (POLLIN) when [`PacketIo::recv_batch`] would deliver
    /// at least one frame, so a worker can poll it together with its other sockets. `None` if the
    /// backend has no such descriptor.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

impl<T: PacketIo + ?Sized> PacketIo for Box<T> {
    fn recv_batch(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<usize> {
        (**self).recv_batch(timeout, f)
    }
    fn send_with(
        &mut self,
        max_len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> std::io::Result<()> {
        (**self).send_with(max_len, fill)
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        (**self).send(frame)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (**self).flush()
    }
    fn stats(&self) -> IoStats {
        (**self).stats()
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn medium(&self) -> Medium {
        (**self).medium()
    }
    fn raw_fd(&self) -> Option<RawFd> {
        (**self).raw_fd()
    }
}

/// Waits until `fd` is readable or `timeout` passes. Returns `true` if readable. `EINTR` counts as
/// "not yet readable" so callers simply return an empty batch.
pub fn poll_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Round up so a sub-millisecond timeout still waits instead of spinning.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds = 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    if r > 0
        && pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0
        && pfd.revents & libc::POLLIN == 0
    {
        return Err(std::io::Error::other(format!(
            "poll on fd {fd} reported an error condition (revents {:#x})",
            pfd.revents
        )));
    }
    Ok(r > 0)
}
