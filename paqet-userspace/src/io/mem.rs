//! In-memory [`PacketIo`] pair for simulated tests.
//!
//! [`pair`] returns two ends joined by two bounded queues (one per direction). A frame sent on one
//! end is received on the other. A full queue drops the frame (counted in `tx_drops`), like a NIC
//! ring would. Optional seeded loss ([`MemIo::set_loss`]) drops a fraction of sent frames
//! deterministically. Buffers are recycled through a per-direction pool, so steady-state traffic
//! does not allocate. Each direction also owns an eventfd that is readable while its queue is not
//! empty, so workers can poll [`PacketIo::raw_fd`] exactly as with a real backend.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{IoStats, PacketIo};

/// Frames delivered per `recv_batch` call at most.
pub const MEM_BATCH: usize = 64;

struct QueueState {
    frames: VecDeque<Vec<u8>>,
    pool: Vec<Vec<u8>>,
}

/// One direction: bounded queue + condvar + eventfd readiness.
struct Link {
    state: Mutex<QueueState>,
    ready: Condvar,
    cap: usize,
    event: OwnedFd,
}

impl Link {
    fn new(cap: usize) -> std::io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            state: Mutex::new(QueueState {
                frames: VecDeque::with_capacity(cap),
                pool: Vec::new(),
            }),
            ready: Condvar::new(),
            cap,
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            event: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic in another test thread must not cascade: the queue data stays consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the eventfd readable. Called with the lock held when the queue becomes non-empty.
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. EAGAIN (counter saturated) is fine.
        unsafe { libc::write(self.event.as_raw_fd(), &one as *const u64 as *const _, 8) };
    }

    /// Clears the eventfd. Called with the lock held when the queue becomes empty.
    fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.event.as_raw_fd(), &mut v as *mut u64 as *mut _, 8) };
    }
}

/// Seeded loss model.
struct Loss {
    rate: f64,
    rng: SmallRng,
}

/// One end of an in-memory link.
pub struct MemIo {
    tx: Arc<Link>,
    rx: Arc<Link>,
    stats: IoStats,
    loss: Option<Loss>,
    /// Frames taken from the RX queue, handed to the callback outside the lock.
    scratch: Vec<Vec<u8>>,
    /// Frames lost to the loss model (not counted as sent or dropped).
    lost: u64,
}

/// Creates two connected ends; each direction queues at most `cap` frames (at least 1).
pub fn pair(cap: usize) -> (MemIo, MemIo) {
    try_pair(cap).expect("eventfd creation failed for mem::pair")
}

/// Like [`pair`] but reports eventfd creation failure instead of panicking.
pub fn try_pair(cap: usize) -> std::io::Result<(MemIo, MemIo)> {
    let cap = cap.max(1);
    let ab = Arc::new(Link::new(cap)?);
    let ba = Arc::new(Link::new(cap)?);
    Ok((MemIo::new(ab.clone(), ba.clone()), MemIo::new(ba, ab)))
}

impl MemIo {
    fn new(tx: Arc<Link>, rx: Arc<Link>) -> Self {
        Self {
            tx,
            rx,
            stats: IoStats::default(),
            loss: None,
            scratch: Vec::with_capacity(MEM_BATCH),
            lost: 0,
        }
    }

    /// Drops each frame sent from this end with probability `rate` (0.0..=1.0), using a RNG seeded
    /// with `seed` so runs are reproducible. `rate <= 0` disables loss.
    pub fn set_loss(&mut self, rate: f64, seed: u64) {
        self.loss = (rate > 0.0).then(|| Loss {
            rate: rate.min(1.0),
            rng: SmallRng::seed_from_u64(seed),
        });
    }

    /// Frames this end's loss model discarded so far.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Frames currently queued towards this end.
    pub fn pending(&self) -> usize {
        self.rx.lock().frames.len()
    }
}

impl PacketIo for MemIo {
    fn recv_batch(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<usize> {
        {
            let deadline = Instant::now() + timeout;
            let mut st = self.rx.lock();
            while st.frames.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(0);
                }
                st = self
                    .rx
                    .ready
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let n = st.frames.len().min(MEM_BATCH);
            self.scratch.extend(st.frames.drain(..n));
            if st.frames.is_empty() {
                self.rx.clear();
            }
        }
        let n = self.scratch.len();
        for frame in &self.scratch {
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += frame.len() as u64;
            f(frame);
        }
        let mut st = self.rx.lock();
        st.pool.append(&mut self.scratch);
        Ok(n)
    }

    fn send_with(
        &mut self,
        max_len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> std::io::Result<()> {
        let mut buf = self.tx.lock().pool.pop().unwrap_or_default();
        buf.clear();
        buf.resize(max_len, 0);
        let len = fill(&mut buf);
        if len > max_len {
            self.stats.tx_errors += 1;
            self.tx.lock().pool.push(buf);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("mem: fill returned {len} bytes, more than max_len {max_len}"),
            ));
        }
        if len == 0 {
            self.tx.lock().pool.push(buf);
            return Ok(());
        }
        buf.truncate(len);
        if let Some(loss) = &mut self.loss {
            if loss.rng.gen_bool(loss.rate) {
                self.lost += 1;
                self.tx.lock().pool.push(buf);
                return Ok(());
            }
        }
        let mut st = self.tx.lock();
        if st.frames.len() >= self.tx.cap {
            self.stats.tx_drops += 1;
            st.pool.push(buf);
            return Ok(());
        }
        let was_empty = st.frames.is_empty();
        st.frames.push_back(buf);
        if was_empty {
            self.tx.signal();
        }
        drop(st);
        self.tx.ready.notify_one();
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        Ok(())
    }

    fn stats(&self) -> IoStats {
        self.stats
    }

    fn name(&self) -> &'static str {
        "mem"
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.rx.event.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::poll_readable;

    #[test]
    fn frames_cross_in_order_and_count() {
        let (mut a, mut b) = pair(16);
        for i in 0..10u8 {
            a.send(&[i; 5]).unwrap();
        }
        let mut got = Vec::new();
        let n = b
            .recv_batch(Duration::from_millis(0), &mut |f| got.push(f.to_vec()))
            .unwrap();
        assert_eq!(n, 10);
        assert_eq!(got, (0..10u8).map(|i| vec![i; 5]).collect::<Vec<_>>());
        assert_eq!(a.stats().tx_frames, 10);
        assert_eq!(a.stats().tx_bytes, 50);
        assert_eq!(b.stats().rx_frames, 10);
        assert_eq!(b.stats().rx_bytes, 50);
        // Nothing flows back the other way.
        assert_eq!(a.recv_batch(Duration::ZERO, &mut |_| {}).unwrap(), 0);
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let (mut a, mut b) = pair(3);
        for _ in 0..5 {
            a.send(b"xyz").unwrap();
        }
        assert_eq!(a.stats().tx_frames, 3);
        assert_eq!(a.stats().tx_drops, 2);
        assert_eq!(b.recv_batch(Duration::ZERO, &mut |_| {}).unwrap(), 3);
    }

    #[test]
    fn batch_limit_applies() {
        let (mut a, mut b) = pair(1000);
        for _ in 0..(MEM_BATCH + 5) {
            a.send(b"q").unwrap();
        }
        assert_eq!(
            b.recv_batch(Duration::ZERO, &mut |_| {}).unwrap(),
            MEM_BATCH
        );
        assert_eq!(b.recv_batch(Duration::ZERO, &mut |_| {}).unwrap(), 5);
    }

    #[test]
    fn send_with_zero_and_oversize() {
        let (mut a, mut b) = pair(4);
        a.send_with(100, &mut |_| 0).unwrap();
        assert!(a.send_with(10, &mut |_| 11).is_err());
        assert_eq!(a.stats().tx_errors, 1);
        a.send_with(100, &mut |buf| {
            buf[..3].copy_from_slice(b"abc");
            3
        })
        .unwrap();
        let mut got = Vec::new();
        b.recv_batch(Duration::ZERO, &mut |f| got.push(f.to_vec()))
            .unwrap();
        assert_eq!(got, vec![b"abc".to_vec()]);
    }

    #[test]
    fn seeded_loss_is_reproducible_and_roughly_right() {
        let run = |seed| {
            let (mut a, mut b) = pair(10_000);
            a.set_loss(0.25, seed);
            for i in 0..4000u32 {
                a.send(&i.to_be_bytes()).unwrap();
            }
            let mut got = Vec::new();
            while b
                .recv_batch(Duration::ZERO, &mut |f| got.push(f.to_vec()))
                .unwrap()
                > 0
            {}
            assert_eq!(got.len() as u64 + a.lost(), 4000);
            got
        };
        let x = run(7);
        assert_eq!(x, run(7));
        assert_ne!(x, run(8));
        assert!((2800..3200).contains(&x.len()), "kept {}", x.len());
    }

    #[test]
    fn eventfd_tracks_queue_state() {
        let (mut a, mut b) = pair(8);
        let fd = b.raw_fd().unwrap();
        assert!(!poll_readable(fd, Duration::ZERO).unwrap());
        a.send(b"1").unwrap();
        a.send(b"2").unwrap();
        assert!(poll_readable(fd, Duration::ZERO).unwrap());
        assert_eq!(b.recv_batch(Duration::ZERO, &mut |_| {}).unwrap(), 2);
        assert!(!poll_readable(fd, Duration::ZERO).unwrap());
    }

    #[test]
    fn recv_wakes_on_send_from_other_thread() {
        let (mut a, mut b) = pair(8);
        let t = std::thread::spawn(move || {
            a.send(b"hello").unwrap();
            a
        });
        let mut got = Vec::new();
        // Generous upper bound; the call returns as soon as the frame arrives.
        while got.is_empty() {
            b.recv_batch(Duration::from_secs(5), &mut |f| got.push(f.to_vec()))
                .unwrap();
        }
        assert_eq!(got, vec![b"hello".to_vec()]);
        t.join().unwrap();
    }
}
