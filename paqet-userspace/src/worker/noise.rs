//! The worker's glue to the authenticated noise wire (`transport.kcp.block = "noise"`,
//! `docs/protocol-extensions.md` §1): one [`NoiseWire`] per worker, sans-IO like the layers it joins.
//!
//! The sessions run with the `null` block mode, so they emit and take bare FEC/KCP bodies; this layer
//! turns each body into one noise transport message and back, and runs the handshakes:
//!
//! - **server**: every received payload goes to the [`NoiseResponder`] first. Handshake messages are
//!   answered (a response, or a cookie reply under load) and nothing else is ever sent to a source that
//!   has not completed a handshake with an allowed key. An opened transport message is fed to the
//!   endpoint exactly like a kcp-go-decrypted datagram; the endpoint's session is then bound to the client
//!   key and the connection that made the keys, and its datagrams are sealed with those keys.
//! - **client**: one [`NoiseInitiator`] per session (per connection slot). The session is created at dial
//!   time as before; its datagrams are dropped until the handshake completes (KCP retransmits them). A new
//!   handshake starts on rekey, after 15 s of sending without receiving (a restarted server), and every
//!   dial (a re-dialled session has a new initiator).
//!
//! What is dropped is counted by [`DropReason::label`] ([`NoiseStats`]); drops that mean "this peer does
//! not speak the noise wire" are logged at most once a minute per source, and a client whose initiations
//! go unanswered for 15 s warns once per episode.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info, warn};

use crate::proto::endpoint::SessionId;
use crate::proto::guard::{Addressing, Guard};
use crate::proto::noise::{
    DropReason, InitiatorConfig, InitiatorOutcome, NoiseInitiator, NoiseResponder, Outcome,
    PublicKey, ResponderConfig,
};

/// The noise wire's settings of a worker.
#[derive(Debug, Clone)]
pub enum NoiseWireConfig {
    /// Server: the responder's keys, allowed clients, timers and rate limits.
    Server(ResponderConfig),
    /// Client: the initiator's keys and timers (one initiator per session).
    Client(InitiatorConfig),
}

/// Every [`DropReason::label`], in a fixed order (the index of [`NoiseStats::drops`]).
pub const DROP_LABELS: [&str; 16] = [
    "malformed",
    "bad_mac1",
    "rate_limited",
    "handshake",
    "unknown_peer",
    "replayed_initiation",
    "unexpected",
    "no_pending_handshake",
    "bad_cookie_reply",
    "unknown_index",
    "expired",
    "replay",
    "too_old",
    "decrypt",
    // not DropReason's: a datagram that could not be sealed (no keys yet / expired), and an opened
    // datagram of one client key arriving for a session bound to another key.
    "seal",
    "peer_mismatch",
];

fn label_index(label: &str) -> usize {
    DROP_LABELS.iter().position(|l| *l == label).unwrap_or(0)
}

/// Counters of the noise layer (summed into the metrics as `paqet_crypto_failures_total{reason="noise_…"}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoiseStats {
    /// Dropped messages by [`DROP_LABELS`] index.
    pub drops: [u64; DROP_LABELS.len()],
    /// Handshakes completed (server: responses sent; client: responses accepted).
    pub handshakes: u64,
    /// Client: initiations sent.
    pub initiations: u64,
    /// Server: cookie replies sent.
    pub cookie_replies: u64,
    /// Payloads without a valid guard prefix.
    pub guard_drops: u64,
}

impl NoiseStats {
    /// `(label, count)` of every non-zero drop counter.
    pub fn nonzero_drops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DROP_LABELS
            .iter()
            .zip(self.drops.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(l, n)| (*l, *n))
    }

    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &NoiseStats) {
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        self.handshakes += o.handshakes;
        self.initiations += o.initiations;
        self.cookie_replies += o.cookie_replies;
        self.guard_drops += o.guard_drops;
    }
}

/// What the worker does with a received payload after the noise layer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rx {
    /// [`NoiseWire::buf`] holds a KCP body: hand it to the endpoint (then call
    /// [`NoiseWire::bind`] with the session that took it, on a server).
    Deliver,
    /// [`NoiseWire::buf`] holds bytes to send back to the source (handshake response, cookie reply,
    /// or the client's confirming keepalive).
    Reply,
    /// The client's session `id` completed a handshake: send [`NoiseWire::buf`] (its keepalive) and
    /// flush the session (datagrams dropped before the keys existed are retransmitted).
    Established(SessionId),
    /// Nothing to do (a keepalive, or a drop already counted).
    Nothing,
}

/// One client session's initiator.
struct Conn {
    init: NoiseInitiator,
}

/// Client: initiations sent since the last completed handshake (over every session: a session whose
/// server never answers dies of its keepalive timeout and is re-dialled with a new initiator).
#[derive(Default)]
struct Unanswered {
    since: Option<u64>,
    count: u32,
    warned: bool,
}

enum Side {
    Server {
        responder: Box<NoiseResponder>,
        /// Session → (client key, source address) it is bound to.
        bound: HashMap<SessionId, (PublicKey, SocketAddr)>,
        /// The key of the datagram being delivered (set by `rx`, consumed by `bind`).
        delivering: Option<(PublicKey, SocketAddr)>,
    },
    Client {
        cfg: InitiatorConfig,
        conns: HashMap<SessionId, Conn>,
        unanswered: Unanswered,
    },
}

/// How often a source's "not the noise wire" drops are logged.
const LOG_EVERY_MS: u64 = 60_000;
/// Unanswered initiations warn after this long.
const UNANSWERED_WARN_MS: u64 = 15_000;
/// How often expired keys and idle rate-limit entries are forgotten.
const EXPIRE_EVERY_MS: u64 = 1_000;
/// Sources remembered for log rate limiting.
const MAX_LOGGED_SOURCES: usize = 1024;

/// The newest initiation timestamp this process used: initiations of every connection (and every
/// worker) share one client key, and the server accepts only strictly newer timestamps per key.
static LAST_INITIATION_MS: AtomicU64 = AtomicU64::new(0);

fn initiation_timestamp(unix_ms: u64) -> u64 {
    let mut prev = LAST_INITIATION_MS.load(Ordering::Relaxed);
    loop {
        let ts = unix_ms.max(prev + 1);
        match LAST_INITIATION_MS.compare_exchange_weak(
            prev,
            ts,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return ts,
            Err(p) => prev = p,
        }
    }
}

/// A worker's noise layer. See the module docs.
pub struct NoiseWire {
    side: Side,
    /// Checks the guard prefix of received payloads (the endpoint's guard is off in noise mode).
    rx_guard: Option<Guard>,
    /// Counters.
    pub stats: NoiseStats,
    /// The opened datagram or the message to send (see [`Rx`]).
    pub(crate) buf: Vec<u8>,
    seal_buf: Vec<u8>,
    logged: HashMap<IpAddr, u64>,
    last_expire: u64,
}

impl NoiseWire {
    /// A worker's noise layer; `guard` checks received guard prefixes (`None`: guard off).
    pub fn new(cfg: NoiseWireConfig, guard: Option<Guard>) -> Self {
        let side = match cfg {
            NoiseWireConfig::Server(c) => Side::Server {
                responder: Box::new(NoiseResponder::new(c)),
                bound: HashMap::new(),
                delivering: None,
            },
            NoiseWireConfig::Client(c) => Side::Client {
                cfg: c,
                conns: HashMap::new(),
                unanswered: Unanswered::default(),
            },
        };
        NoiseWire {
            side,
            rx_guard: guard,
            stats: NoiseStats::default(),
            buf: Vec::with_capacity(2048),
            seal_buf: Vec::with_capacity(2048),
            logged: HashMap::new(),
            last_expire: 0,
        }
    }

    fn count(&mut self, label: &str) {
        self.stats.drops[label_index(label)] += 1;
    }

    /// Whether `src` may be logged now (once per [`LOG_EVERY_MS`]).
    fn may_log(&mut self, now: u64, src: IpAddr) -> bool {
        if let Some(&at) = self.logged.get(&src) {
            if now.saturating_sub(at) < LOG_EVERY_MS {
                return false;
            }
        } else if self.logged.len() >= MAX_LOGGED_SOURCES {
            self.logged
                .retain(|_, at| now.saturating_sub(*at) < LOG_EVERY_MS);
            if self.logged.len() >= MAX_LOGGED_SOURCES {
                return false;
            }
        }
        self.logged.insert(src, now);
        true
    }

    fn dropped(&mut self, now: u64, src: SocketAddr, why: &DropReason) {
        self.count(why.label());
        match why {
            DropReason::Malformed(_) | DropReason::BadMac1 => {
                if self.may_log(now, src.ip()) {
                    let hint = match self.side {
                        Side::Server { .. } => "an upstream paqet client (kcp-go framing), or a client with another server public key or PSK?",
                        Side::Client { .. } => "an upstream paqet server, or a server with another key or PSK?",
                    };
                    info!(%src, reason = why.label(), "noise: dropping non-noise packets from {src} ({hint})");
                }
            }
            DropReason::UnknownPeer(k) => {
                if self.may_log(now, src.ip()) {
                    info!(%src, client_key = %k, "noise: initiation from {src} with client public key {k}, which is not in transport.noise.client_public_keys: no answer");
                }
            }
            other => debug!(%src, reason = other.label(), "noise: message dropped"),
        }
    }

    /// Handles one received payload (guard prefix included when the guard is on), addressed as `at`;
    /// `session` is the client's session the payload arrived for (`None` on a server). `now` is the
    /// worker's monotonic ms clock, `unix_secs` the guard's clock.
    pub(crate) fn rx(
        &mut self,
        now: u64,
        unix_secs: u64,
        at: &Addressing,
        session: Option<SessionId>,
        payload: &[u8],
    ) -> Rx {
        let src = at.src;
        let mut body = payload;
        if let Some(g) = self.rx_guard.as_mut() {
            if !g.check(unix_secs, at, payload) {
                self.stats.guard_drops += 1;
                return Rx::Nothing;
            }
            body = &payload[g.prefix_len()..];
        }
        let mut buf = std::mem::take(&mut self.buf);
        let r = match &mut self.side {
            Side::Server {
                responder,
                delivering,
                ..
            } => match responder.handle(now, src, body, &mut buf) {
                Outcome::Reply => {
                    self.stats.cookie_replies += 1;
                    Ok(Rx::Reply)
                }
                Outcome::Handshake { peer } => {
                    self.stats.handshakes += 1;
                    debug!(%src, client_key = %peer, "noise: handshake answered");
                    Ok(Rx::Reply)
                }
                Outcome::Data { peer } => {
                    *delivering = Some((peer, src));
                    Ok(Rx::Deliver)
                }
                Outcome::Keepalive { .. } => Ok(Rx::Nothing),
                Outcome::Drop(why) => Err(why),
            },
            Side::Client {
                conns, unanswered, ..
            } => {
                let Some(id) = session else {
                    self.buf = buf;
                    self.count("unknown_index");
                    return Rx::Nothing;
                };
                let Some(c) = conns.get_mut(&id) else {
                    self.buf = buf;
                    self.count("unknown_index");
                    return Rx::Nothing;
                };
                match c.init.handle(now, body, &mut buf) {
                    InitiatorOutcome::Established => {
                        self.stats.handshakes += 1;
                        if unanswered.warned {
                            info!(server = %src, "noise: handshake with {src} completed");
                        } else {
                            debug!(server = %src, "noise: handshake completed");
                        }
                        *unanswered = Unanswered::default();
                        Ok(Rx::Established(id))
                    }
                    // A cookie arrived: the next poll sends a new initiation at once.
                    InitiatorOutcome::CookieStored => Ok(Rx::Nothing),
                    InitiatorOutcome::Data => Ok(Rx::Deliver),
                    InitiatorOutcome::Keepalive => Ok(Rx::Nothing),
                    InitiatorOutcome::Drop(why) => Err(why),
                }
            }
        };
        self.buf = buf;
        match r {
            Ok(rx) => rx,
            Err(why) => {
                self.dropped(now, src, &why);
                Rx::Nothing
            }
        }
    }

    /// Server: the endpoint delivered the datagram [`rx`](Self::rx) opened to session `id`. Binds a new
    /// session to the datagram's client key; returns false (the caller must not trust the datagram) when
    /// `id` is bound to another key.
    pub(crate) fn bind(&mut self, id: SessionId) -> bool {
        let Side::Server {
            bound, delivering, ..
        } = &mut self.side
        else {
            return true;
        };
        let Some((peer, src)) = delivering.take() else {
            return true;
        };
        match bound.get(&id) {
            Some((k, _)) if *k != peer => {
                self.count("peer_mismatch");
                false
            }
            Some(_) => true,
            None => {
                bound.insert(id, (peer, src));
                true
            }
        }
    }

    /// Server: whether the datagram [`rx`](Self::rx) opened may go to session `id` (not bound to
    /// another client key). Call before handing it to the endpoint when the session is known.
    pub(crate) fn may_deliver_to(&mut self, id: SessionId) -> bool {
        let ok = match &self.side {
            Side::Server {
                bound, delivering, ..
            } => match (bound.get(&id), delivering) {
                (Some((k, _)), Some((peer, _))) => k == peer,
                _ => true,
            },
            Side::Client { .. } => true,
        };
        if !ok {
            self.count("peer_mismatch");
        }
        ok
    }

    /// Seals one KCP body of session `id`; `None` (counted) when it has no keys yet or they expired.
    pub(crate) fn seal(&mut self, now: u64, id: SessionId, dgram: &[u8]) -> Option<&[u8]> {
        let mut out = std::mem::take(&mut self.seal_buf);
        let r = match &mut self.side {
            Side::Server {
                responder, bound, ..
            } => match bound.get(&id) {
                Some((peer, addr)) => responder
                    .seal_to(now, peer, *addr, dgram, &mut out)
                    .map_err(|e| e.label()),
                None => Err("no_session"),
            },
            Side::Client { conns, .. } => match conns.get_mut(&id) {
                Some(c) => c.init.seal(now, dgram, &mut out).map_err(|e| e.label()),
                None => Err("no_session"),
            },
        };
        self.seal_buf = out;
        match r {
            Ok(()) => Some(&self.seal_buf),
            Err(why) => {
                self.count("seal");
                tracing::trace!(session = id, why, "noise: datagram not sealed");
                None
            }
        }
    }

    /// Client: a session was dialled; it gets its own initiator.
    pub(crate) fn session_added(&mut self, id: SessionId) {
        if let Side::Client { cfg, conns, .. } = &mut self.side {
            conns.insert(
                id,
                Conn {
                    init: NoiseInitiator::new(cfg.clone()),
                },
            );
        }
    }

    /// A session left the endpoint's table.
    pub(crate) fn session_gone(&mut self, id: SessionId) {
        match &mut self.side {
            Side::Server { bound, .. } => {
                bound.remove(&id);
            }
            Side::Client { conns, .. } => {
                conns.remove(&id);
            }
        }
    }

    /// Timers: returns the initiations due (client: `(session, bytes)`), and on a server the sessions
    /// whose keys are all gone (the caller closes them). `server` names the peer in warnings.
    pub(crate) fn tick(
        &mut self,
        now: u64,
        unix_ms: u64,
        server: Option<SocketAddr>,
    ) -> (Vec<(SessionId, Vec<u8>)>, Vec<SessionId>) {
        let mut sends = Vec::new();
        let mut dead = Vec::new();
        let expire = now.saturating_sub(self.last_expire) >= EXPIRE_EVERY_MS;
        if expire {
            self.last_expire = now;
        }
        match &mut self.side {
            Side::Server {
                responder, bound, ..
            } => {
                if expire {
                    let (_, gone) = responder.expire_sessions(now);
                    for (k, addr) in gone {
                        dead.extend(
                            bound
                                .iter()
                                .filter(|(_, b)| **b == (k, addr))
                                .map(|(id, _)| *id),
                        );
                    }
                }
            }
            Side::Client {
                cfg,
                conns,
                unanswered,
            } => {
                for (&id, c) in conns.iter_mut() {
                    if expire {
                        c.init.expire(now);
                    }
                    if c.init.poll_at().is_some_and(|at| at <= now) {
                        if let Some(m) = c.init.poll(now, initiation_timestamp(unix_ms)) {
                            self.stats.initiations += 1;
                            unanswered.since.get_or_insert(now);
                            unanswered.count += 1;
                            sends.push((id, m));
                        }
                    }
                }
                if let Some(since) = unanswered.since {
                    let waited = now.saturating_sub(since);
                    if waited >= UNANSWERED_WARN_MS && !unanswered.warned {
                        unanswered.warned = true;
                        let n = unanswered.count;
                        let server = server.map(|s| s.to_string()).unwrap_or_default();
                        warn!(
                            %server,
                            initiations = n,
                            "noise: no handshake response from {server} after {n} initiations in {} s: is the server paqet-dp with transport.kcp.block = \"noise\", does its transport.noise.client_public_keys list this client's public key {}, and do transport.noise.server_public_key and the psk match? (an upstream paqet server never answers the noise wire)",
                            waited / 1000,
                            cfg.private.public_key()
                        );
                    }
                }
            }
        }
        (sends, dead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a datagram from `src` to the server is addressed (the guard is off in these tests).
    fn to_server(src: SocketAddr) -> Addressing {
        Addressing {
            src,
            dst: "10.0.0.1:9999".parse().unwrap(),
            to_server: true,
        }
    }

    /// How a datagram from the server `src` to a client is addressed.
    fn to_client(src: SocketAddr) -> Addressing {
        Addressing {
            src,
            dst: "10.0.0.2:40000".parse().unwrap(),
            to_server: false,
        }
    }
    use crate::proto::noise::{keygen, RateLimits, Timers};

    fn pair() -> (NoiseWire, NoiseWire) {
        let (sk, sp) = keygen();
        let (ck, cp) = keygen();
        let server = NoiseWire::new(
            NoiseWireConfig::Server(ResponderConfig {
                private: sk,
                allowed: vec![cp],
                psk: None,
                timers: Timers::default(),
                rate: RateLimits::default(),
            }),
            None,
        );
        let client = NoiseWire::new(
            NoiseWireConfig::Client(InitiatorConfig {
                private: ck,
                server: sp,
                psk: None,
                timers: Timers::default(),
            }),
            None,
        );
        (server, client)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn handshake_bind_and_both_directions() {
        let (mut s, mut c) = pair();
        let (csrc, ssrc) = (addr("10.0.0.2:40000"), addr("10.0.0.1:9999"));
        c.session_added(7);
        assert!(
            c.seal(0, 7, b"early").is_none(),
            "no keys before the handshake"
        );
        let (sends, _) = c.tick(0, 1_800_000_000_000, Some(ssrc));
        assert_eq!(sends.len(), 1);
        assert_eq!(s.rx(0, 0, &to_server(csrc), None, &sends[0].1), Rx::Reply);
        let resp = s.buf.clone();
        assert_eq!(
            c.rx(0, 0, &to_client(ssrc), Some(7), &resp),
            Rx::Established(7)
        );
        let ka = c.buf.clone();
        assert_eq!(s.rx(0, 0, &to_server(csrc), None, &ka), Rx::Nothing);
        let up = c.seal(1, 7, b"kcp body").unwrap().to_vec();
        assert_eq!(s.rx(1, 0, &to_server(csrc), None, &up), Rx::Deliver);
        assert_eq!(s.buf, b"kcp body");
        assert!(s.may_deliver_to(3));
        assert!(s.bind(3));
        let down = s.seal(2, 3, b"reply body").unwrap().to_vec();
        assert_eq!(c.rx(2, 0, &to_client(ssrc), Some(7), &down), Rx::Deliver);
        assert_eq!(c.buf, b"reply body");
        // kcp-go framing from the same source: dropped and counted, never answered
        let kcpgo = [0x5au8; 60];
        assert_eq!(s.rx(3, 0, &to_server(csrc), None, &kcpgo), Rx::Nothing);
        assert!(s
            .stats
            .nonzero_drops()
            .any(|(l, _)| l == "malformed" || l == "bad_mac1"));
        s.session_gone(3);
        assert!(s.seal(4, 3, b"x").is_none());
    }

    /// A session bound to one client key never takes a datagram opened with another allowed key (a client
    /// sending from another client's address and port).
    #[test]
    fn a_session_bound_to_one_key_refuses_another_keys_datagrams() {
        let (sk, sp) = keygen();
        let (ak, ap) = keygen();
        let (bk, bp) = keygen();
        let mut s = NoiseWire::new(
            NoiseWireConfig::Server(ResponderConfig {
                private: sk,
                allowed: vec![ap, bp],
                psk: None,
                timers: Timers::default(),
                rate: RateLimits::default(),
            }),
            None,
        );
        let src = addr("10.0.0.2:40000");
        let ssrc = addr("10.0.0.1:9999");
        let mut bodies = Vec::new();
        for (k, unix) in [(ak, 1_800_000_000_000u64), (bk, 1_800_000_000_001)] {
            let mut c = NoiseWire::new(
                NoiseWireConfig::Client(InitiatorConfig {
                    private: k,
                    server: sp,
                    psk: None,
                    timers: Timers::default(),
                }),
                None,
            );
            c.session_added(1);
            let (sends, _) = c.tick(0, unix, Some(ssrc));
            assert_eq!(s.rx(0, 0, &to_server(src), None, &sends[0].1), Rx::Reply);
            let resp = s.buf.clone();
            assert_eq!(
                c.rx(0, 0, &to_client(ssrc), Some(1), &resp),
                Rx::Established(1)
            );
            bodies.push(c.seal(1, 1, b"body").unwrap().to_vec());
        }
        assert_eq!(s.rx(1, 0, &to_server(src), None, &bodies[0]), Rx::Deliver);
        assert!(s.may_deliver_to(5) && s.bind(5));
        assert_eq!(s.rx(1, 0, &to_server(src), None, &bodies[1]), Rx::Deliver);
        assert!(
            !s.may_deliver_to(5),
            "key B's datagram must not reach key A's session"
        );
        assert!(s.stats.nonzero_drops().any(|(l, _)| l == "peer_mismatch"));
    }

    #[test]
    fn initiation_timestamps_grow_within_a_process() {
        let a = initiation_timestamp(5);
        let b = initiation_timestamp(5);
        assert!(b > a);
    }
}
