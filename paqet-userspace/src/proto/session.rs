//! One paqet session: crypto framing + optional FEC + KCP + smux v2, composed as a sans-IO state machine.
//!
//! The session is fed decrypted-or-not datagrams (the TCP payloads of the envelope) and `now` in
//! milliseconds; it yields datagrams to put on the wire, stream events and the next deadline. It never
//! reads a clock or touches a socket, so the daemon, the data plane and the tests drive the same code:
//!
//! ```text
//! handle_datagram(now, payload) ─► crypto.open ─► FEC decode ─► KCP input ─► smux input ─► events
//! write(sid, bytes) ─► smux frames ─► KCP send ─► KCP flush ─► FEC encode ─► crypto.seal ─► transmit(datagram)
//! ```
//!
//! The guard prefix (spec §5) is not the session's: [`crate::proto::endpoint`] checks and strips it first.
use std::fmt;

use thiserror::Error;

use crate::proto::cc::CcStats;
use crate::proto::fec::{FecDecoder, FecEncoder};
use crate::proto::kcp::{Kcp, KcpConfig, KcpError};
use crate::proto::smux::{Role as SmuxRole, Smux, SmuxConfig, SmuxError, SmuxEvent};
use crate::wire::crypt::{CryptError, Crypto};
use crate::wire::fec::FEC_DATA_HEADER;

/// Largest datagram (TCP payload) a session ever emits or accepts: kcp-go's `mtuLimit`.
pub const MAX_DATAGRAM: usize = 1500;

/// Which end of the tunnel this session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Server => "server",
        })
    }
}

/// Everything a session needs; cheap to clone per session.
#[derive(Clone)]
pub struct SessionConfig {
    /// Block mode and key (already derived).
    pub crypto: Crypto,
    /// FEC data shards (0 = off; both `dshard` and `pshard` must be > 0 to enable FEC).
    pub dshard: usize,
    /// FEC parity shards.
    pub pshard: usize,
    /// KCP settings. Its `mtu` is overwritten from `mtu` below minus the framing overhead.
    pub kcp: KcpConfig,
    /// smux settings.
    pub smux: SmuxConfig,
    /// Datagram size limit (upstream `transport.kcp.mtu`, 50..=1500): includes crypto and FEC headers.
    pub mtu: usize,
}

impl SessionConfig {
    /// Checks what a session cannot run with: FEC shard counts the Reed-Solomon coder refuses. (The config
    /// module refuses them too; this guards every other way of building a `SessionConfig`.)
    pub fn validate(&self) -> Result<(), SessionConfigError> {
        let (dshard, pshard) = (self.dshard, self.pshard);
        if self.fec_enabled() && (dshard > 255 || pshard > 255 || dshard + pshard > 256) {
            return Err(SessionConfigError::FecShards { dshard, pshard });
        }
        Ok(())
    }

    /// True when FEC is on (both shard counts > 0, as upstream).
    pub fn fec_enabled(&self) -> bool {
        self.dshard > 0 && self.pshard > 0
    }

    /// Bytes of framing in front of the KCP bytes of every data datagram.
    pub fn header_overhead(&self) -> usize {
        self.crypto.header_len()
            + if self.fec_enabled() {
                FEC_DATA_HEADER
            } else {
                0
            }
    }

    /// The MTU KCP gets: `min(mtu, 1500)` minus crypto header, crypto trailer and FEC header (spec §3.3).
    pub fn kcp_mtu(&self) -> usize {
        self.mtu
            .min(MAX_DATAGRAM)
            .saturating_sub(self.header_overhead() + self.crypto.trailer_len())
    }
}

/// A [`SessionConfig`] a session cannot be built from.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionConfigError {
    /// FEC is on (both counts > 0) but the Reed-Solomon coder cannot be built with these counts. Turning
    /// FEC off instead would make every datagram unreadable to a peer that has it on.
    #[error(
        "transport.kcp.dshard = {dshard}, transport.kcp.pshard = {pshard}: FEC shard counts must be 0..=255 \
         each with dshard + pshard <= 256 (FEC is on when both are > 0, off when either is 0)"
    )]
    FecShards { dshard: usize, pshard: usize },
}

/// Why a datagram or the session failed. Datagram-level errors are counted and leave the session intact;
/// [`SessionError::Dead`] means the session must be dropped.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("crypto: {0}")]
    Crypto(#[from] CryptError),
    #[error("fec: {0}")]
    Fec(#[from] crate::proto::fec::FecError),
    #[error("kcp: {0}")]
    Kcp(#[from] KcpError),
    #[error("smux: {0}")]
    Smux(#[from] SmuxError),
    #[error("datagram of {0} bytes exceeds the {MAX_DATAGRAM}-byte limit")]
    TooLong(usize),
    #[error("session is closed")]
    Dead,
}

impl SessionError {
    /// A short label for metrics (`reason="crc"` …).
    pub fn reason(&self) -> &'static str {
        match self {
            SessionError::Crypto(CryptError::CrcMismatch { .. }) => "crc",
            SessionError::Crypto(CryptError::AuthFailed { .. }) => "auth",
            SessionError::Crypto(_) => "crypto",
            SessionError::Fec(_) => "fec",
            SessionError::Kcp(_) => "kcp",
            SessionError::Smux(_) => "smux",
            SessionError::TooLong(_) => "too_long",
            SessionError::Dead => "dead",
        }
    }
}

/// Per-session counters (the daemon sums them into metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub crypto_failures: u64,
    pub fec_errors: u64,
    pub kcp_errors: u64,
}

/// One client or server session (one KCP conversation with one peer).
pub struct Session {
    role: Role,
    crypto: Crypto,
    fec_enc: Option<FecEncoder>,
    fec_dec: Option<FecDecoder>,
    kcp: Kcp,
    smux: Smux,
    /// Bytes read out of KCP that smux did not take yet (its receive buffer was full).
    rx_pending: Vec<u8>,
    rx_pending_off: usize,
    /// smux frames on their way into KCP; `tx_scratch[tx_off..]` is not in KCP yet.
    tx_scratch: Vec<u8>,
    tx_off: usize,
    /// Datagrams sealed by the last KCP flush, waiting for `poll_transmit` to hand them out.
    out_queue: Vec<u8>,
    out_lens: Vec<usize>,
    stats: SessionStats,
    dead: bool,
    /// Largest smux receive window (per stream) auto-tuning may advertise, bytes; 0 = no auto-tuning.
    smux_auto_max: usize,
}

impl Session {
    /// A new session. `conv` is the KCP conversation id (random on a client, the peer's on a server).
    /// Fails when FEC is on with shard counts the Reed-Solomon coder refuses (see
    /// [`SessionConfig::validate`]): FEC is never turned off behind the configuration's back.
    pub fn new(
        role: Role,
        conv: u32,
        cfg: &SessionConfig,
        now: u32,
    ) -> Result<Self, SessionConfigError> {
        cfg.validate()?;
        let mut kcfg = cfg.kcp.clone();
        kcfg.mtu = cfg.kcp_mtu();
        let reserved = cfg.header_overhead();
        let fec = cfg.fec_enabled();
        let smux_role = match role {
            Role::Client => SmuxRole::Client,
            Role::Server => SmuxRole::Server,
        };
        let bad_shards = |_| SessionConfigError::FecShards {
            dshard: cfg.dshard,
            pshard: cfg.pshard,
        };
        let (fec_enc, fec_dec) = if fec {
            (
                Some(
                    FecEncoder::new(cfg.dshard, cfg.pshard, cfg.crypto.header_len())
                        .map_err(bad_shards)?,
                ),
                Some(FecDecoder::new(cfg.dshard, cfg.pshard).map_err(bad_shards)?),
            )
        } else {
            (None, None)
        };
        Ok(Session {
            role,
            crypto: cfg.crypto.clone(),
            fec_enc,
            fec_dec,
            kcp: Kcp::new(conv, &kcfg, reserved),
            smux: Smux::new(smux_role, cfg.smux.clone(), now),
            rx_pending: Vec::with_capacity(64 * 1024),
            rx_pending_off: 0,
            tx_scratch: Vec::with_capacity(128 * 1024),
            tx_off: 0,
            out_queue: Vec::with_capacity(16 * MAX_DATAGRAM),
            out_lens: Vec::with_capacity(16),
            stats: SessionStats::default(),
            dead: false,
            smux_auto_max: if kcfg.autotune.rcvwnd {
                kcfg.autotune.max_wnd as usize * kcfg.mtu
            } else {
                0
            },
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn conv(&self) -> u32 {
        self.kcp.conv()
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    pub fn kcp(&self) -> &Kcp {
        &self.kcp
    }

    /// Congestion-control, RTT and window state of the sending side (see [`CcStats`]).
    pub fn cc_stats(&self) -> CcStats {
        self.kcp.cc_stats()
    }

    pub fn smux(&self) -> &Smux {
        &self.smux
    }

    /// True once smux declared the session dead (keepalive timeout, protocol error) or it was closed.
    pub fn is_dead(&self) -> bool {
        self.dead || self.smux.is_dead()
    }

    /// Feed one received datagram (the envelope's TCP payload). It is decrypted in place.
    /// Errors are per datagram (counted in [`SessionStats`]) unless they are [`SessionError::Dead`].
    pub fn handle_datagram(&mut self, now: u32, pkt: &mut [u8]) -> Result<(), SessionError> {
        if self.is_dead() {
            return Err(SessionError::Dead);
        }
        if pkt.len() > MAX_DATAGRAM {
            return Err(SessionError::TooLong(pkt.len()));
        }
        let body = match self.crypto.open(pkt) {
            Ok(r) => r,
            Err(e) => {
                self.stats.crypto_failures += 1;
                return Err(e.into());
            }
        };
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += pkt.len() as u64;
        let body = &pkt[body];
        let kcp = &mut self.kcp;
        let mut kerr: Option<KcpError> = None;
        match self.fec_dec.as_mut() {
            Some(dec) if crate::wire::fec::is_fec(body) => {
                let r = dec.decode(body, now, &mut |k: &[u8]| {
                    if let Err(e) = kcp.input(now, k) {
                        kerr.get_or_insert(e);
                    }
                });
                if let Err(e) = r {
                    self.stats.fec_errors += 1;
                    return Err(e.into());
                }
            }
            _ => {
                if let Err(e) = kcp.input(now, body) {
                    kerr = Some(e);
                }
            }
        }
        self.tune_smux();
        if let Some(e) = kerr {
            self.stats.kcp_errors += 1;
            // Deliver what did arrive before reporting.
            self.pump_rx(now)?;
            return Err(e.into());
        }
        self.pump_rx(now)
    }

    /// Receive-window auto-tuning reaches smux: its per-stream window must cover what KCP's receive window
    /// lets in flight (twice, since smux's window updates come every half window), or a stream stalls on
    /// smux flow control below the path's bandwidth-delay product. The session buffer follows at twice
    /// the stream window. Both stay within the auto-tuning memory cap.
    fn tune_smux(&mut self) {
        if self.smux_auto_max == 0 {
            return;
        }
        let want = (2 * self.kcp.rcv_wnd() as usize * self.kcp.mss()).min(self.smux_auto_max);
        if want > self.smux.receive_buffers().0 {
            self.smux.grow_receive_buffers(want, 2 * want);
        }
    }

    /// Move ordered bytes from KCP into smux while smux has room (its session buffer is the back-pressure).
    fn pump_rx(&mut self, now: u32) -> Result<(), SessionError> {
        loop {
            if self.rx_pending_off < self.rx_pending.len() {
                let n = self
                    .smux
                    .input(now, &self.rx_pending[self.rx_pending_off..])
                    .map_err(|e| {
                        self.dead = true;
                        SessionError::Smux(e)
                    })?;
                self.rx_pending_off += n;
                if self.rx_pending_off < self.rx_pending.len() {
                    return Ok(()); // smux is full; KCP keeps the rest and its window shrinks
                }
            }
            self.rx_pending.clear();
            self.rx_pending_off = 0;
            let avail = self.kcp.readable();
            if avail == 0 || self.smux.receive_capacity() == 0 {
                return Ok(());
            }
            let want = avail.min(256 * 1024);
            self.rx_pending.resize(want, 0);
            let n = self.kcp.recv(&mut self.rx_pending[..]);
            self.rx_pending.truncate(n);
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Run timers and move pending stream data into KCP and out as datagrams. Every datagram to send is
    /// passed to `transmit`. Call after `handle_datagram`, after stream writes/reads, and at
    /// [`Session::poll_deadline`].
    pub fn poll_transmit(&mut self, now: u32, transmit: &mut dyn FnMut(&[u8])) {
        if self.is_dead() {
            return;
        }
        // Reading may have freed smux buffer space: drain KCP further.
        let _ = self.pump_rx(now);
        self.smux.handle_timeout(now);
        if self.smux.is_dead() {
            return;
        }
        // smux → KCP, bounded by KCP's send capacity. smux emits whole frames (it may exceed the capacity
        // once); what KCP does not take yet stays in `tx_scratch` for the next round.
        loop {
            if self.tx_off < self.tx_scratch.len() {
                self.tx_off += self.kcp.send(&self.tx_scratch[self.tx_off..]);
                if self.tx_off < self.tx_scratch.len() {
                    break;
                }
            }
            self.tx_scratch.clear();
            self.tx_off = 0;
            let cap = self.kcp.send_capacity();
            if cap == 0 || !self.smux.has_pending() {
                break;
            }
            if self.smux.poll_transmit(&mut self.tx_scratch, cap) == 0 {
                break;
            }
        }
        let Session {
            kcp,
            fec_enc,
            crypto,
            out_queue,
            out_lens,
            stats,
            ..
        } = self;
        out_queue.clear();
        out_lens.clear();
        let crypt_hdr = crypto.header_len();
        let trailer = crypto.trailer_len();
        // Every datagram of this flush is queued unsealed (crypto header space + body + trailer space),
        // then all are sealed together: the AES modes encrypt several datagrams side by side.
        let mut queue_raw = |buf: &[u8], len: usize| {
            out_queue.extend_from_slice(&buf[..len]);
            out_queue.resize(out_queue.len() + trailer, 0);
            out_lens.push(len + trailer);
        };
        let rto = kcp.rto();
        let mut emit = |buf: &mut [u8]| {
            let len = buf.len();
            match fec_enc.as_mut() {
                Some(enc) => {
                    let kcp_len = len - crypt_hdr - FEC_DATA_HEADER;
                    let mut parity: Vec<(Vec<u8>, usize)> = Vec::new();
                    let used = enc.encode(buf, kcp_len, now, rto, &mut |p: &mut [u8]| {
                        parity.push((p.to_vec(), p.len()));
                    });
                    queue_raw(buf, used);
                    for (p, l) in parity {
                        queue_raw(&p, l);
                    }
                }
                None => queue_raw(buf, len),
            }
        };
        kcp.update(now, &mut emit);
        if out_lens.is_empty() {
            return;
        }
        let mut slots: Vec<&mut [u8]> = Vec::with_capacity(out_lens.len());
        let mut rest = &mut out_queue[..];
        for &l in out_lens.iter() {
            let (slot, tail) = rest.split_at_mut(l);
            slots.push(slot);
            rest = tail;
        }
        if crypto.seal_batch(&mut slots).is_err() {
            // Only a slot shorter than the crypto header can fail, which KCP never emits; send nothing
            // rather than anything unsealed.
            return;
        }
        for slot in slots {
            stats.datagrams_out += 1;
            stats.bytes_out += slot.len() as u64;
            transmit(slot);
        }
    }

    /// When [`Session::poll_transmit`] must be called again at the latest (ms, same clock as `now`).
    pub fn poll_deadline(&self, now: u32) -> u32 {
        let k = self.kcp.next_deadline(now);
        let s = self.smux.next_deadline();
        if (s.wrapping_sub(k) as i32) < 0 {
            s
        } else {
            k
        }
    }

    // ---- streams (delegated to smux) ----

    /// Open a new stream (client side). The SYN goes out with the next `poll_transmit`.
    pub fn open_stream(&mut self) -> Result<u32, SessionError> {
        if self.is_dead() {
            return Err(SessionError::Dead);
        }
        Ok(self.smux.open_stream()?)
    }

    /// Queue bytes on a stream; returns how many were accepted (flow control may take fewer).
    pub fn write(&mut self, sid: u32, data: &[u8]) -> Result<usize, SessionError> {
        Ok(self.smux.write(sid, data)?)
    }

    /// Queue one datagram as one smux frame, all or nothing (UDP streams).
    pub fn write_datagram(&mut self, sid: u32, data: &[u8]) -> Result<bool, SessionError> {
        Ok(self.smux.write_datagram(sid, data)?)
    }

    /// Read stream bytes; `Ok(0)` means nothing now (see [`Session::is_fin`] for end of stream).
    pub fn read(&mut self, sid: u32, buf: &mut [u8]) -> Result<usize, SessionError> {
        Ok(self.smux.read(sid, buf)?)
    }

    /// Read one frame's payload (UDP datagram boundary).
    pub fn read_frame(&mut self, sid: u32) -> Result<Option<Vec<u8>>, SessionError> {
        Ok(self.smux.read_frame(sid)?)
    }

    /// True when the peer closed the stream and everything was read.
    pub fn is_fin(&self, sid: u32) -> bool {
        self.smux.is_fin(sid)
    }

    /// Close a stream (FIN; paqet has no half-close).
    pub fn close_stream(&mut self, sid: u32) {
        self.smux.close(sid);
    }

    /// Next stream event.
    pub fn poll_event(&mut self) -> Option<SmuxEvent> {
        self.smux.poll_event()
    }

    /// Mark the session closed (nothing more is sent or accepted).
    pub fn close(&mut self) {
        self.dead = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::kcp::KcpMode;
    use crate::wire::crypt::BlockMode;

    fn cfg(dshard: usize, pshard: usize) -> SessionConfig {
        SessionConfig {
            crypto: Crypto::from_derived(BlockMode::Aes, &[3; 32]).expect("crypto"),
            dshard,
            pshard,
            kcp: KcpConfig::preset(KcpMode::Fast),
            smux: SmuxConfig::default(),
            mtu: 1350,
        }
    }

    #[test]
    fn bad_fec_shard_counts_are_an_error_not_fec_off() {
        for (d, p) in [(200, 100), (256, 1), (1, 256), (300, 5)] {
            let err = Session::new(Role::Client, 1, &cfg(d, p), 0)
                .err()
                .unwrap_or_else(|| panic!("dshard {d} pshard {p} accepted"));
            assert_eq!(
                err,
                SessionConfigError::FecShards {
                    dshard: d,
                    pshard: p
                }
            );
            let msg = err.to_string();
            assert!(
                msg.contains("transport.kcp.dshard = ")
                    && msg.contains("transport.kcp.pshard = ")
                    && msg.contains("0..=255")
                    && msg.contains("<= 256"),
                "{msg}"
            );
        }
        // FEC off (either count 0, as upstream) and the largest valid groups build.
        for (d, p) in [(0, 0), (0, 3), (10, 0), (10, 3), (128, 128), (255, 1)] {
            let s = Session::new(Role::Server, 1, &cfg(d, p), 0).expect("valid counts");
            assert_eq!(s.fec_enc.is_some(), d > 0 && p > 0, "dshard {d} pshard {p}");
            assert_eq!(s.fec_dec.is_some(), d > 0 && p > 0);
        }
    }

    #[test]
    fn fec_session_pair_carries_a_stream() {
        let c = cfg(10, 3);
        let mut a = Session::new(Role::Client, 9, &c, 0).expect("client");
        let mut b = Session::new(Role::Server, 9, &c, 0).expect("server");
        let sid = a.open_stream().expect("stream");
        assert_eq!(a.write(sid, b"over fec").expect("write"), 8);
        let mut wire = Vec::new();
        a.poll_transmit(1, &mut |d| wire.push(d.to_vec()));
        assert!(!wire.is_empty());
        for mut d in wire {
            b.handle_datagram(2, &mut d).expect("datagram");
        }
        let mut buf = [0u8; 16];
        assert_eq!(b.read(sid, &mut buf).expect("read"), 8);
        assert_eq!(&buf[..8], b"over fec");
    }
}
