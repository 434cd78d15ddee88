//! Opt-in authenticated paqet-dp wire ("noise"): sans-IO handshake and transport state machines.
//!
//! Both ends must be paqet-dp with this layer enabled; an upstream paqet peer never answers (its kcp-go
//! crypt layer fails the checksum of every noise message and drops it silently). The byte map, the clear
//! bytes and what they reveal are in `docs/protocol-extensions.md`; the codec is [`crate::wire::noise`].
//!
//! - Handshake: Noise `IK` (`IKpsk2` when a pre-shared key is set) over X25519 / ChaCha20-Poly1305 /
//!   BLAKE2s, run by `snow`. The client knows the server's static public key; the server accepts only
//!   client static keys from its allowed list. The initiation payload is the client's wall-clock
//!   timestamp (unix ms); the server keeps the newest per client key and refuses anything not newer, so a
//!   replayed initiation gets no answer. Fresh ephemeral keys per handshake give forward secrecy.
//! - mac1 on every handshake message is keyed by the receiver's static public key (and the PSK), so only
//!   someone who knows the server's public key (and the PSK) can make the server do any Diffie-Hellman
//!   work or answer at all. Under load (the global initiation budget is spent) the server answers a valid
//!   mac1 with a cookie reply instead; the client retries with mac2 keyed by that cookie, which proves it
//!   owns its source address. Initiations are also rate-limited per source IP (token bucket).
//! - Transport: one kcp datagram per message, sealed with snow's `StatelessTransportState` under an
//!   explicit 64-bit counter (datagrams are lost and reordered), checked against a sliding replay window
//!   of [`REPLAY_WINDOW`] counters per direction.
//! - Rekey: the client starts a new handshake after [`Timers::rekey_after_ms`] or
//!   [`Timers::rekey_after_messages`]; the previous keys keep opening in-flight datagrams for
//!   [`Timers::previous_grace_ms`]. The server switches its sending keys once the client has used the new
//!   ones (the client sends a keepalive right after each handshake), so nothing is sealed under keys the
//!   peer does not hold yet.
//!
//! Nothing here reads a clock or touches a socket: every call takes `now` (monotonic milliseconds) and the
//! initiator additionally takes the wall clock (`unix_ms`) for the initiation timestamp.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use base64::Engine as _;
use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac as _};
use blake2::{Blake2s256, Blake2sMac, Digest as _};
use chacha20poly1305::aead::AeadInPlace as _;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use snow::params::{DHChoice, NoiseParams};
use snow::resolvers::{CryptoResolver as _, DefaultResolver};
use snow::{Builder, HandshakeState, StatelessTransportState};
use thiserror::Error;

use crate::wire::noise::{self as w, Message};

/// Length of keys (X25519 private/public, PSK).
pub const KEY_LEN: usize = 32;
/// Length of a key in text form (base64, standard alphabet, padded).
pub const KEY_TEXT_LEN: usize = 44;
/// Counters a replay window tracks behind the newest one.
pub const REPLAY_WINDOW: u64 = ((WINDOW_WORDS - 1) * 64) as u64;
const WINDOW_WORDS: usize = 64;

/// Noise protocol name without a PSK.
pub const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Noise protocol name with a PSK (mixed in after the second message's DH).
pub const PATTERN_PSK: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Noise prologue: binds every handshake to this wire version.
pub const PROLOGUE: &[u8] = b"paqet-dp noise v1";
const LABEL_MAC1: &[u8] = b"paqet-dp noise mac1";
const LABEL_COOKIE: &[u8] = b"paqet-dp noise cookie";

// ---------------------------------------------------------------------------------------------------------
// Keys

/// Errors parsing a key from text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// The text is empty.
    #[error("key is empty (expected 44 base64 characters, as printed by `paqet-dp keygen`)")]
    Empty,
    /// Wrong number of characters.
    #[error(
        "key has {0} characters; a key is 44 base64 characters (standard alphabet, ending in '=')"
    )]
    Length(usize),
    /// Not base64.
    #[error("key is not valid base64 (standard alphabet A-Z a-z 0-9 + /, '=' padding): {0}")]
    Base64(String),
    /// Decodes to the wrong size (cannot happen for 44 valid characters, kept for completeness).
    #[error("key decodes to {0} bytes; a key is 32 bytes")]
    Size(usize),
    /// A private key whose public key is not usable (all-zero key).
    #[error("private key is all zeros")]
    Zero,
}

fn parse_key(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(KeyError::Empty);
    }
    if t.len() != KEY_TEXT_LEN {
        return Err(KeyError::Length(t.chars().count()));
    }
    let v = base64::engine::general_purpose::STANDARD
        .decode(t)
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    v.as_slice().try_into().map_err(|_| KeyError::Size(v.len()))
}

fn key_text(k: &[u8; KEY_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// An X25519 public key (a server's identity, or an allowed client).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// Parses the 44-character base64 form.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        parse_key(text).map(PublicKey)
    }
    /// The 44-character base64 form.
    pub fn to_text(&self) -> String {
        key_text(&self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_text())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

fn wipe(b: &mut [u8]) {
    for x in b.iter_mut() {
        // SAFETY: `x` is a valid, aligned, exclusive reference; a volatile write keeps the wipe.
        unsafe { std::ptr::write_volatile(x, 0) };
    }
}

/// An X25519 private key. `Debug` does not print it; it is wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// Parses the 44-character base64 form.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let k = parse_key(text)?;
        if k == [0u8; KEY_LEN] {
            return Err(KeyError::Zero);
        }
        Ok(PrivateKey(k))
    }
    /// Wraps raw bytes (clamping happens inside X25519).
    pub fn from_bytes(k: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        if k == [0u8; KEY_LEN] {
            return Err(KeyError::Zero);
        }
        Ok(PrivateKey(k))
    }
    /// The 44-character base64 form.
    pub fn to_text(&self) -> String {
        key_text(&self.0)
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow's default resolver always has X25519");
        dh.set(&self.0);
        let mut p = [0u8; KEY_LEN];
        p.copy_from_slice(dh.pubkey());
        PublicKey(p)
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

/// An optional 32-byte pre-shared key (both ends). `Debug` does not print it; it is wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; KEY_LEN]);

impl Psk {
    /// Parses the 44-character base64 form.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        parse_key(text).map(Psk)
    }
    /// Wraps raw bytes.
    pub fn from_bytes(k: [u8; KEY_LEN]) -> Self {
        Psk(k)
    }
    /// A fresh random PSK.
    pub fn generate() -> Self {
        Psk(random_array())
    }
    /// The 44-character base64 form.
    pub fn to_text(&self) -> String {
        key_text(&self.0)
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// Generates a fresh X25519 static keypair (for `paqet-dp keygen`).
pub fn keygen() -> (PrivateKey, PublicKey) {
    loop {
        let k = PrivateKey(random_array());
        if k.0 != [0u8; KEY_LEN] {
            let p = k.public_key();
            return (k, p);
        }
    }
}

fn random_array<const N: usize>() -> [u8; N] {
    let mut a = [0u8; N];
    getrandom::getrandom(&mut a).expect("the OS random source is available");
    a
}

fn random_u8() -> u8 {
    random_array::<1>()[0]
}

// ---------------------------------------------------------------------------------------------------------
// Tunables

/// Timers and budgets (milliseconds / message counts). Defaults follow WireGuard's orders of magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// The client starts a new handshake once its keys are this old.
    pub rekey_after_ms: u64,
    /// Keys older than this neither seal nor open.
    pub reject_after_ms: u64,
    /// The client starts a new handshake after sealing this many datagrams under one key.
    pub rekey_after_messages: u64,
    /// No key seals more than this many datagrams.
    pub reject_after_messages: u64,
    /// An unanswered initiation is replaced by a new one after this long.
    pub handshake_retry_ms: u64,
    /// Previous keys keep opening datagrams this long after being replaced.
    pub previous_grace_ms: u64,
    /// The client starts a new handshake when it has sent datagrams for this long without receiving any
    /// (the server may have restarted and forgotten the session).
    pub silence_rekey_ms: u64,
    /// The server's cookie secret rotates this often.
    pub cookie_secret_ms: u64,
    /// The client uses a received cookie for this long.
    pub cookie_valid_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            rekey_after_ms: 120_000,
            reject_after_ms: 180_000,
            rekey_after_messages: 1 << 60,
            reject_after_messages: u64::MAX - (1 << 13),
            handshake_retry_ms: 5_000,
            previous_grace_ms: 15_000,
            silence_rekey_ms: 15_000,
            cookie_secret_ms: 120_000,
            cookie_valid_ms: 110_000,
        }
    }
}

/// Initiation rate limits on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Initiations accepted per second from one source IP (after mac1).
    pub per_source_per_sec: u32,
    /// Burst allowed per source IP.
    pub per_source_burst: u32,
    /// Initiations per second (all sources) processed without a cookie; above it the server is "under
    /// load" and answers initiations without a valid mac2 with a cookie reply.
    pub global_per_sec: u32,
    /// Burst of the global budget.
    pub global_burst: u32,
    /// Most source IPs tracked; when full, sources with a full bucket are forgotten first.
    pub max_sources: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_source_per_sec: 20,
            per_source_burst: 5,
            global_per_sec: 200,
            global_burst: 50,
            max_sources: 4096,
        }
    }
}

/// A sans-IO token bucket (tokens in thousandths).
#[derive(Debug, Clone)]
struct Bucket {
    milli: u64,
    last: u64,
}

impl Bucket {
    fn full(burst: u32, now: u64) -> Self {
        Bucket {
            milli: u64::from(burst) * 1000,
            last: now,
        }
    }
    fn refill(&mut self, now: u64, per_sec: u32, burst: u32) {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let cap = u64::from(burst) * 1000;
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(u64::from(per_sec)))
            .min(cap);
    }
    fn take(&mut self, now: u64, per_sec: u32, burst: u32) -> bool {
        self.refill(now, per_sec, burst);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Replay window

/// Sliding replay window over 64-bit counters: accepts each counter once, reordering up to
/// [`REPLAY_WINDOW`] behind the newest.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Newest accepted counter + 1 (0: none yet).
    top: u64,
    bits: [u64; WINDOW_WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: 0,
            bits: [0; WINDOW_WORDS],
        }
    }
}

impl ReplayWindow {
    const BITS: u64 = (WINDOW_WORDS * 64) as u64;

    /// Whether `c` would be accepted (does not record it: call [`accept`](Self::accept) once the datagram
    /// authenticated).
    pub fn check(&self, c: u64) -> Result<(), DropReason> {
        if c == u64::MAX {
            // never sent (the message budget ends well before) and would overflow `top`
            return Err(DropReason::Replay);
        }
        if c >= self.top {
            return Ok(());
        }
        if self.top - 1 - c >= REPLAY_WINDOW {
            return Err(DropReason::TooOld);
        }
        let bit = c % Self::BITS;
        if self.bits[(bit / 64) as usize] >> (bit % 64) & 1 == 1 {
            return Err(DropReason::Replay);
        }
        Ok(())
    }

    /// Records `c` (after a successful [`check`](Self::check)).
    pub fn accept(&mut self, c: u64) {
        if c >= self.top {
            let new_word = c / 64;
            if self.top > 0 {
                let cur_word = (self.top - 1) / 64;
                let clear = (new_word - cur_word).min(WINDOW_WORDS as u64);
                for i in 1..=clear {
                    self.bits[((cur_word + i) % WINDOW_WORDS as u64) as usize] = 0;
                }
            }
            self.top = c + 1;
        }
        let bit = c % Self::BITS;
        self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Errors

/// Why an incoming message was dropped (never answered). [`label`](Self::label) is a metric label.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DropReason {
    /// Not a noise-wire message.
    #[error("malformed noise message: {0}")]
    Malformed(#[from] w::NoiseWireError),
    /// mac1 does not match: the sender does not know our public key (or the PSK), or the bytes changed.
    #[error("bad mac1 (sender does not know this end's public key or the PSK)")]
    BadMac1,
    /// The source exceeded its initiation rate.
    #[error("initiation rate limit exceeded for this source")]
    RateLimited,
    /// Noise refused the handshake message.
    #[error("noise handshake message refused")]
    Handshake,
    /// The client's static key is not in the allowed list.
    #[error("client static key {0} is not allowed")]
    UnknownPeer(PublicKey),
    /// The initiation's timestamp is not newer than the newest seen from that client.
    #[error("replayed or stale initiation")]
    ReplayedInitiation,
    /// A message this end never accepts (e.g. a response sent to a server).
    #[error("unexpected {0} message for this end")]
    Unexpected(&'static str),
    /// No handshake is waiting for this response or cookie reply.
    #[error("no pending handshake for this message")]
    NoPendingHandshake,
    /// A cookie reply that does not open.
    #[error("cookie reply does not authenticate")]
    BadCookieReply,
    /// No session has this receiver index.
    #[error("unknown receiver index")]
    UnknownIndex,
    /// The session's keys are too old.
    #[error("session keys expired")]
    Expired,
    /// Counter already seen.
    #[error("replayed transport counter")]
    Replay,
    /// Counter behind the replay window.
    #[error("transport counter too old for the replay window")]
    TooOld,
    /// AEAD open failed.
    #[error("transport message does not authenticate")]
    Decrypt,
}

impl DropReason {
    /// A short, stable label for metrics (`snake_case`).
    pub const fn label(&self) -> &'static str {
        match self {
            DropReason::Malformed(_) => "malformed",
            DropReason::BadMac1 => "bad_mac1",
            DropReason::RateLimited => "rate_limited",
            DropReason::Handshake => "handshake",
            DropReason::UnknownPeer(_) => "unknown_peer",
            DropReason::ReplayedInitiation => "replayed_initiation",
            DropReason::Unexpected(_) => "unexpected",
            DropReason::NoPendingHandshake => "no_pending_handshake",
            DropReason::BadCookieReply => "bad_cookie_reply",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::Expired => "expired",
            DropReason::Replay => "replay",
            DropReason::TooOld => "too_old",
            DropReason::Decrypt => "decrypt",
        }
    }
}

/// Why a datagram could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SealError {
    /// No session yet (handshake not finished) or this peer has none.
    #[error("no noise session (handshake not finished)")]
    NoSession,
    /// The keys are past their time or message budget; a new handshake is needed.
    #[error("noise session keys expired (a new handshake is needed)")]
    Expired,
    /// The datagram does not fit a Noise message (65535 bytes with its tag).
    #[error("datagram of {0} bytes is too large for a noise transport message")]
    TooLarge(usize),
}

impl SealError {
    /// A short, stable label for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            SealError::NoSession => "no_session",
            SealError::Expired => "expired",
            SealError::TooLarge(_) => "too_large",
        }
    }
}

/// Errors building an endpoint from its configuration.
#[derive(Debug, Error)]
pub enum NoiseConfigError {
    /// snow refused the parameters (a bug: the patterns are constants).
    #[error("noise setup failed: {0}")]
    Snow(String),
}

// ---------------------------------------------------------------------------------------------------------
// Shared helpers

fn params(psk: bool) -> NoiseParams {
    (if psk { PATTERN_PSK } else { PATTERN })
        .parse()
        .expect("constant noise pattern parses")
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut m =
        <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("mac keys are 16 or 32 bytes");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time comparison (lengths are public).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut d = 0u8;
    for (x, y) in a.iter().zip(b) {
        d |= x ^ y;
    }
    std::hint::black_box(d) == 0
}

/// mac1 key of an end: `BLAKE2s-256(label | its public key | psk-or-empty)`.
fn mac1_key(public: &PublicKey, psk: Option<&Psk>) -> [u8; 32] {
    hash(&[LABEL_MAC1, &public.0, psk.map(|p| &p.0[..]).unwrap_or(&[])])
}

/// Cookie-reply encryption key of a server: `BLAKE2s-256(label | server public key)`.
fn cookie_key(server: &PublicKey) -> [u8; 32] {
    hash(&[LABEL_COOKIE, &server.0])
}

fn addr_bytes(src: &SocketAddr) -> ([u8; 18], usize) {
    let mut b = [0u8; 18];
    let n = match src.ip() {
        IpAddr::V4(v4) => {
            b[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            b[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    b[n..n + 2].copy_from_slice(&src.port().to_be_bytes());
    (b, n + 2)
}

fn random_index(taken: impl Fn(u32) -> bool) -> u32 {
    loop {
        let i = u32::from_le_bytes(random_array());
        if !taken(i) {
            return i;
        }
    }
}

/// One direction pair of transport keys (one handshake's result).
struct Keys {
    local: u32,
    remote: u32,
    state: StatelessTransportState,
    sent: u64,
    window: ReplayWindow,
    born: u64,
    /// When these keys stopped being current (previous keys only).
    retired: Option<u64>,
}

impl Keys {
    fn expired(&self, now: u64, t: &Timers) -> bool {
        now.saturating_sub(self.born) >= t.reject_after_ms
            || self
                .retired
                .is_some_and(|r| now.saturating_sub(r) >= t.previous_grace_ms)
    }

    fn seal(
        &mut self,
        now: u64,
        t: &Timers,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        if now.saturating_sub(self.born) >= t.reject_after_ms
            || self.sent >= t.reject_after_messages
        {
            return Err(SealError::Expired);
        }
        if datagram.len() + w::TAG_LEN > u16::MAX as usize {
            return Err(SealError::TooLarge(datagram.len()));
        }
        out.clear();
        out.resize(w::TRANSPORT_HEADER_LEN + datagram.len() + w::TAG_LEN, 0);
        w::put_transport_header(out, self.remote, self.sent);
        let n = self
            .state
            .write_message(self.sent, datagram, &mut out[w::TRANSPORT_HEADER_LEN..])
            .map_err(|_| SealError::TooLarge(datagram.len()))?;
        out.truncate(w::TRANSPORT_HEADER_LEN + n);
        w::finish_transport(out);
        self.sent += 1;
        Ok(())
    }

    fn open(
        &mut self,
        now: u64,
        t: &Timers,
        m: &w::Transport<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), DropReason> {
        if self.expired(now, t) {
            return Err(DropReason::Expired);
        }
        self.window.check(m.counter)?;
        out.clear();
        out.resize(m.sealed.len(), 0);
        let n = self
            .state
            .read_message(m.counter, m.sealed, out)
            .map_err(|_| DropReason::Decrypt)?;
        out.truncate(n);
        self.window.accept(m.counter);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Responder (server)

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ResponderConfig {
    /// The server's static private key.
    pub private: PrivateKey,
    /// Client static public keys allowed to connect.
    pub allowed: Vec<PublicKey>,
    /// Optional pre-shared key (both ends must hold the same one).
    pub psk: Option<Psk>,
    /// Timers and budgets.
    pub timers: Timers,
    /// Initiation rate limits.
    pub rate: RateLimits,
}

/// What the responder made of one incoming message. Bytes to send or deliver are in the `out` buffer
/// given to [`NoiseResponder::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Under load: `out` holds a cookie reply to send back to the source.
    Reply,
    /// A handshake completed: `out` holds the response to send back to the source. Transport datagrams
    /// from this peer follow; data to it can be sealed right away.
    Handshake {
        /// The client's static key (stable across rekeys; use it as the session's identity).
        peer: PublicKey,
    },
    /// `out` holds one authenticated datagram (a kcp datagram) from `peer`.
    Data {
        /// The client's static key.
        peer: PublicKey,
    },
    /// An authenticated empty datagram (the client confirming new keys); nothing to deliver.
    Keepalive {
        /// The client's static key.
        peer: PublicKey,
    },
    /// Dropped silently (no answer); the reason is for logs and metrics.
    Drop(DropReason),
}

/// One allowed client key: the newest initiation timestamp and its sessions, one per source address the
/// handshakes came from (a client may run several connections, each from its own port, with one key).
#[derive(Default)]
struct Peer {
    newest_ts: Option<u64>,
    sessions: HashMap<SocketAddr, Slots>,
    addr: Option<SocketAddr>,
}

/// The keys of one session (one client connection).
#[derive(Default)]
struct Slots {
    /// Sealing keys (confirmed by the client).
    current: Option<Keys>,
    /// Replaced keys, opening in-flight datagrams during the grace period.
    previous: Option<Keys>,
    /// Keys from the latest handshake, not yet used by the client.
    next: Option<Keys>,
}

impl Slots {
    fn slots(&mut self) -> [&mut Option<Keys>; 3] {
        [&mut self.next, &mut self.current, &mut self.previous]
    }
    fn can_seal(&self) -> bool {
        self.current.is_some() || self.next.is_some()
    }
    fn is_empty(&self) -> bool {
        self.current.is_none() && self.next.is_none() && self.previous.is_none()
    }
}

/// The server end: answers initiations, opens and seals transport messages. See the module docs.
pub struct NoiseResponder {
    private: PrivateKey,
    public: PublicKey,
    psk: Option<Psk>,
    timers: Timers,
    rate: RateLimits,
    params: NoiseParams,
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    peers: HashMap<PublicKey, Peer>,
    /// Receiver index → (client key, source address of the handshake that made the keys).
    index: HashMap<u32, (PublicKey, SocketAddr)>,
    sources: HashMap<IpAddr, Bucket>,
    global: Option<Bucket>,
    secret: [u8; 32],
    secret_born: Option<u64>,
}

impl fmt::Debug for NoiseResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseResponder")
            .field("public", &self.public)
            .field("peers", &self.peers.len())
            .field("sessions", &self.index.len())
            .finish()
    }
}

impl NoiseResponder {
    /// Builds a responder.
    pub fn new(cfg: ResponderConfig) -> Self {
        let public = cfg.private.public_key();
        let peers = cfg.allowed.iter().map(|k| (*k, Peer::default())).collect();
        NoiseResponder {
            mac1_key: mac1_key(&public, cfg.psk.as_ref()),
            cookie_key: cookie_key(&public),
            params: params(cfg.psk.is_some()),
            private: cfg.private,
            public,
            psk: cfg.psk,
            timers: cfg.timers,
            rate: cfg.rate,
            peers,
            index: HashMap::new(),
            sources: HashMap::new(),
            global: None,
            secret: [0; 32],
            secret_born: None,
        }
    }

    /// The server's public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The source address `peer` last sent an authenticated message from.
    pub fn peer_addr(&self, peer: &PublicKey) -> Option<SocketAddr> {
        self.peers.get(peer).and_then(|p| p.addr)
    }

    /// Whether `peer` has keys that can seal (for any of its connections).
    pub fn has_session(&self, peer: &PublicKey) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.sessions.values().any(Slots::can_seal))
    }

    /// Whether the connection of `peer` whose handshake came from `addr` has keys that can seal.
    pub fn has_session_at(&self, peer: &PublicKey, addr: SocketAddr) -> bool {
        self.peers
            .get(peer)
            .and_then(|p| p.sessions.get(&addr))
            .is_some_and(Slots::can_seal)
    }

    fn cookie_for(&mut self, now: u64, src: &SocketAddr) -> [u8; 16] {
        if self
            .secret_born
            .is_none_or(|b| now.saturating_sub(b) >= self.timers.cookie_secret_ms)
        {
            self.secret = random_array();
            self.secret_born = Some(now);
        }
        let (a, n) = addr_bytes(src);
        mac16(&self.secret, &[&a[..n]])
    }

    /// Handles one message from `src`. `out` receives the reply to send (for [`Outcome::Reply`] and
    /// [`Outcome::Handshake`]) or the opened datagram (for [`Outcome::Data`]); it is cleared otherwise.
    pub fn handle(
        &mut self,
        now: u64,
        src: SocketAddr,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Outcome {
        out.clear();
        let r = match w::parse(bytes) {
            Err(e) => Err(DropReason::Malformed(e)),
            Ok(Message::Initiation(m)) => self.initiation(now, src, &m, out),
            Ok(Message::Transport(m)) => self.transport(now, src, &m, out),
            Ok(Message::Response(_)) => Err(DropReason::Unexpected("response")),
            Ok(Message::CookieReply(_)) => Err(DropReason::Unexpected("cookie reply")),
        };
        r.unwrap_or_else(|e| {
            out.clear();
            Outcome::Drop(e)
        })
    }

    fn initiation(
        &mut self,
        now: u64,
        src: SocketAddr,
        m: &w::Initiation<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Outcome, DropReason> {
        // 1. mac1: only someone who knows our public key (and the PSK) gets any further.
        if !ct_eq(&mac16(&self.mac1_key, &[m.mac1_covered()]), m.mac1) {
            return Err(DropReason::BadMac1);
        }
        // 2. Under load, only initiations with a valid cookie (mac2) from this source are processed.
        let rate = self.rate;
        let global = self
            .global
            .get_or_insert_with(|| Bucket::full(rate.global_burst, now));
        if !global.take(now, rate.global_per_sec, rate.global_burst) {
            let cookie = self.cookie_for(now, &src);
            if !ct_eq(&mac16(&cookie, &[m.mac2_covered()]), m.mac2) {
                self.cookie_reply(m, &cookie, out);
                return Ok(Outcome::Reply);
            }
        }
        // 3. Per-source rate limit.
        if !self.source_bucket(now, src.ip()) {
            return Err(DropReason::RateLimited);
        }
        // 4. Noise IK message 1.
        let mut hs = self
            .builder()
            .build_responder()
            .map_err(|_| DropReason::Handshake)?;
        let mut payload = [0u8; 64];
        let n = hs
            .read_message(m.noise, &mut payload)
            .map_err(|_| DropReason::Handshake)?;
        if n != w::TIMESTAMP_LEN {
            return Err(DropReason::Handshake);
        }
        let ts = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
        let client = PublicKey(
            hs.get_remote_static()
                .and_then(|s| s.try_into().ok())
                .ok_or(DropReason::Handshake)?,
        );
        let peer = self
            .peers
            .get(&client)
            .ok_or(DropReason::UnknownPeer(client))?;
        if peer.newest_ts.is_some_and(|t| ts <= t) {
            return Err(DropReason::ReplayedInitiation);
        }
        // 5. Noise IK message 2 and the response.
        let index = &self.index;
        let local = random_index(|i| index.contains_key(&i));
        out.resize(w::RESPONSE_LEN, 0);
        out[0] = w::handshake_type_byte(w::TYPE_RESPONSE, random_u8());
        out[1..5].copy_from_slice(&local.to_le_bytes());
        out[5..9].copy_from_slice(&m.sender.to_le_bytes());
        let n = hs
            .write_message(&[], &mut out[9..9 + w::NOISE_RESP_LEN])
            .map_err(|_| DropReason::Handshake)?;
        debug_assert_eq!(n, w::NOISE_RESP_LEN);
        let mac = mac16(
            &mac1_key(&client, self.psk.as_ref()),
            &[&out[..w::RESPONSE_LEN - w::MAC_LEN]],
        );
        out[w::RESPONSE_LEN - w::MAC_LEN..].copy_from_slice(&mac);
        let state = hs
            .into_stateless_transport_mode()
            .map_err(|_| DropReason::Handshake)?;
        let keys = Keys {
            local,
            remote: m.sender,
            state,
            sent: 0,
            window: ReplayWindow::default(),
            born: now,
            retired: None,
        };
        let peer = self.peers.get_mut(&client).expect("checked above");
        peer.newest_ts = Some(ts);
        peer.addr = Some(src);
        if let Some(old) = peer.sessions.entry(src).or_default().next.replace(keys) {
            self.index.remove(&old.local);
        }
        self.index.insert(local, (client, src));
        Ok(Outcome::Handshake { peer: client })
    }

    fn builder(&self) -> Builder<'_> {
        let b = Builder::new(self.params.clone())
            .prologue(PROLOGUE)
            .and_then(|b| b.local_private_key(&self.private.0))
            .expect("fresh builder accepts prologue and key");
        match &self.psk {
            Some(p) => b.psk(2, &p.0).expect("psk slot 2 is free"),
            None => b,
        }
    }

    fn source_bucket(&mut self, now: u64, ip: IpAddr) -> bool {
        let (per, burst) = (self.rate.per_source_per_sec, self.rate.per_source_burst);
        if !self.sources.contains_key(&ip) && self.sources.len() >= self.rate.max_sources {
            // Forget sources whose bucket has refilled (they are indistinguishable from new ones).
            self.sources.retain(|_, b| {
                b.refill(now, per, burst);
                b.milli < u64::from(burst) * 1000
            });
            if self.sources.len() >= self.rate.max_sources {
                return false;
            }
        }
        self.sources
            .entry(ip)
            .or_insert_with(|| Bucket::full(burst, now))
            .take(now, per, burst)
    }

    fn cookie_reply(&self, m: &w::Initiation<'_>, cookie: &[u8; 16], out: &mut Vec<u8>) {
        let nonce: [u8; w::COOKIE_NONCE_LEN] = random_array();
        out.clear();
        out.resize(w::COOKIE_REPLY_LEN, 0);
        out[0] = w::handshake_type_byte(w::TYPE_COOKIE_REPLY, random_u8());
        out[1..5].copy_from_slice(&m.sender.to_le_bytes());
        out[5..29].copy_from_slice(&nonce);
        let mut body = *cookie;
        let aead = XChaCha20Poly1305::new((&self.cookie_key).into());
        let aad = [&out[..5], m.mac1].concat();
        let tag = aead
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut body)
            .expect("16-byte cookie always encrypts");
        out[29..45].copy_from_slice(&body);
        out[45..].copy_from_slice(&tag);
    }

    fn transport(
        &mut self,
        now: u64,
        src: SocketAddr,
        m: &w::Transport<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Outcome, DropReason> {
        let (client, hs_addr) = *self
            .index
            .get(&m.receiver)
            .ok_or(DropReason::UnknownIndex)?;
        let t = self.timers;
        let peer = self
            .peers
            .get_mut(&client)
            .ok_or(DropReason::UnknownIndex)?;
        peer.addr = Some(src);
        let slots = peer
            .sessions
            .get_mut(&hs_addr)
            .ok_or(DropReason::UnknownIndex)?;
        let mut which = None;
        for (i, slot) in slots.slots().into_iter().enumerate() {
            if let Some(k) = slot.as_mut().filter(|k| k.local == m.receiver) {
                k.open(now, &t, m, out)?;
                which = Some(i);
                break;
            }
        }
        match which {
            None => return Err(DropReason::UnknownIndex),
            Some(0) => {
                // First use of the newest keys: they become the sealing keys, the old ones stay for the grace.
                let new = slots.next.take().expect("slot 0 is next");
                if let Some(mut cur) = slots.current.replace(new) {
                    cur.retired = Some(now);
                    if let Some(old) = slots.previous.replace(cur) {
                        self.index.remove(&old.local);
                    }
                }
            }
            Some(_) => {}
        }
        Ok(if out.is_empty() {
            Outcome::Keepalive { peer: client }
        } else {
            Outcome::Data { peer: client }
        })
    }

    /// Seals one datagram to `peer` into `out` (send it to [`peer_addr`](Self::peer_addr)), under the keys
    /// of its connection from [`peer_addr`](Self::peer_addr).
    pub fn seal(
        &mut self,
        now: u64,
        peer: &PublicKey,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let addr = self.peer_addr(peer).ok_or(SealError::NoSession)?;
        self.seal_to(now, peer, addr, datagram, out)
    }

    /// Seals one datagram into `out` for the connection of `peer` whose handshake came from `addr`.
    pub fn seal_to(
        &mut self,
        now: u64,
        peer: &PublicKey,
        addr: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let t = &self.timers;
        let p = self
            .peers
            .get_mut(peer)
            .and_then(|p| p.sessions.get_mut(&addr))
            .ok_or(SealError::NoSession)?;
        let keys = match (&mut p.current, &mut p.next) {
            (Some(c), _) => c,
            (None, Some(n)) => n,
            (None, None) => return Err(SealError::NoSession),
        };
        keys.seal(now, t, datagram, out)
    }

    /// Housekeeping (call every second or so): forgets expired keys and idle rate-limit entries.
    /// Returns the peers that lost their last keys (their sessions are over).
    pub fn expire(&mut self, now: u64) -> Vec<PublicKey> {
        self.expire_sessions(now).0
    }

    /// [`expire`](Self::expire), also returning each connection (client key, handshake source) that lost
    /// its last keys.
    pub fn expire_sessions(&mut self, now: u64) -> (Vec<PublicKey>, Vec<(PublicKey, SocketAddr)>) {
        let mut gone = Vec::new();
        let mut gone_sessions = Vec::new();
        for (k, p) in self.peers.iter_mut() {
            let had = !p.sessions.is_empty();
            p.sessions.retain(|addr, s| {
                for slot in s.slots() {
                    if slot.as_ref().is_some_and(|x| x.expired(now, &self.timers)) {
                        if let Some(x) = slot.take() {
                            self.index.remove(&x.local);
                        }
                    }
                }
                let keep = !s.is_empty();
                if !keep {
                    gone_sessions.push((*k, *addr));
                }
                keep
            });
            if had && p.sessions.is_empty() {
                gone.push(*k);
            }
        }
        let (per, burst) = (self.rate.per_source_per_sec, self.rate.per_source_burst);
        self.sources.retain(|_, b| {
            b.refill(now, per, burst);
            b.milli < u64::from(burst) * 1000
        });
        (gone, gone_sessions)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Initiator (client)

/// Client configuration.
#[derive(Debug, Clone)]
pub struct InitiatorConfig {
    /// The client's static private key.
    pub private: PrivateKey,
    /// The server's static public key.
    pub server: PublicKey,
    /// Optional pre-shared key (both ends must hold the same one).
    pub psk: Option<Psk>,
    /// Timers and budgets.
    pub timers: Timers,
}

/// What the initiator made of one incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorOutcome {
    /// The handshake completed; `out` holds a keepalive to send to the server right away (it confirms the
    /// new keys so the server switches to them).
    Established,
    /// The server asked for a cookie (it is under load); [`NoiseInitiator::poll`] now returns a new
    /// initiation carrying mac2.
    CookieStored,
    /// `out` holds one authenticated datagram from the server.
    Data,
    /// An authenticated empty datagram; nothing to deliver.
    Keepalive,
    /// Dropped; the reason is for logs and metrics.
    Drop(DropReason),
}

struct Pending {
    hs: HandshakeState,
    local: u32,
    sent_at: u64,
    mac1: [u8; 16],
    retry_now: bool,
}

/// The client end: starts (and restarts) handshakes, seals and opens transport messages.
pub struct NoiseInitiator {
    private: PrivateKey,
    public: PublicKey,
    server: PublicKey,
    psk: Option<Psk>,
    timers: Timers,
    params: NoiseParams,
    server_mac1_key: [u8; 32],
    own_mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    pending: Option<Pending>,
    /// When the first initiation of the current unanswered series was sent.
    unanswered_since: Option<u64>,
    initiations_unanswered: u32,
    cookie: Option<([u8; 16], u64)>,
    current: Option<Keys>,
    previous: Option<Keys>,
    newest_ts: u64,
    /// When the first datagram was sealed since the last one received.
    silent_since: Option<u64>,
}

impl fmt::Debug for NoiseInitiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseInitiator")
            .field("public", &self.public)
            .field("server", &self.server)
            .field("established", &self.current.is_some())
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

impl NoiseInitiator {
    /// Builds an initiator (no message is produced until [`poll`](Self::poll)).
    pub fn new(cfg: InitiatorConfig) -> Self {
        let public = cfg.private.public_key();
        NoiseInitiator {
            server_mac1_key: mac1_key(&cfg.server, cfg.psk.as_ref()),
            own_mac1_key: mac1_key(&public, cfg.psk.as_ref()),
            cookie_key: cookie_key(&cfg.server),
            params: params(cfg.psk.is_some()),
            private: cfg.private,
            public,
            server: cfg.server,
            psk: cfg.psk,
            timers: cfg.timers,
            pending: None,
            unanswered_since: None,
            initiations_unanswered: 0,
            cookie: None,
            current: None,
            previous: None,
            newest_ts: 0,
            silent_since: None,
        }
    }

    /// The client's public key (what the server's allowed list must contain).
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Whether transport keys exist (datagrams can be sealed).
    pub fn is_established(&self) -> bool {
        self.current.is_some()
    }

    /// How long initiations have gone unanswered, and how many were sent, if any are. The endpoint must
    /// log this clearly (e.g. past 15 s): the server may be upstream paqet (which ignores noise), hold a
    /// different key or PSK, not list this client, or be unreachable.
    pub fn unanswered(&self, now: u64) -> Option<(u64, u32)> {
        self.unanswered_since
            .map(|s| (now.saturating_sub(s), self.initiations_unanswered))
    }

    fn wants_handshake(&self, now: u64) -> bool {
        let t = &self.timers;
        match &self.current {
            None => true,
            Some(k) => {
                now.saturating_sub(k.born) >= t.rekey_after_ms
                    || k.sent >= t.rekey_after_messages
                    || self
                        .silent_since
                        .is_some_and(|s| now.saturating_sub(s) >= t.silence_rekey_ms)
            }
        }
    }

    /// When [`poll`](Self::poll) next has something to do (a retry or rekey deadline), if known.
    pub fn poll_at(&self) -> Option<u64> {
        let t = &self.timers;
        if let Some(p) = &self.pending {
            return Some(if p.retry_now {
                0
            } else {
                p.sent_at + t.handshake_retry_ms
            });
        }
        match &self.current {
            None => Some(0),
            Some(k) => {
                let mut at = k.born + t.rekey_after_ms;
                if let Some(s) = self.silent_since {
                    at = at.min(s + t.silence_rekey_ms);
                }
                Some(at)
            }
        }
    }

    /// Returns an initiation to send when one is due: no session yet, the previous initiation went
    /// unanswered for [`Timers::handshake_retry_ms`] (or a cookie arrived), or a rekey is due.
    /// `unix_ms` is the wall clock (the initiation timestamp must grow across client restarts).
    pub fn poll(&mut self, now: u64, unix_ms: u64) -> Option<Vec<u8>> {
        if !self.wants_handshake(now) {
            return None;
        }
        if let Some(p) = &self.pending {
            if !p.retry_now && now.saturating_sub(p.sent_at) < self.timers.handshake_retry_ms {
                return None;
            }
        }
        Some(self.initiate(now, unix_ms))
    }

    /// Builds a new initiation now (replacing any pending one).
    pub fn initiate(&mut self, now: u64, unix_ms: u64) -> Vec<u8> {
        let ts = unix_ms.max(self.newest_ts + 1);
        self.newest_ts = ts;
        let mut hs = Builder::new(self.params.clone())
            .prologue(PROLOGUE)
            .and_then(|b| b.local_private_key(&self.private.0))
            .and_then(|b| b.remote_public_key(&self.server.0))
            .and_then(|b| match &self.psk {
                Some(p) => b.psk(2, &p.0),
                None => Ok(b),
            })
            .and_then(|b| b.build_initiator())
            .expect("constant parameters and 32-byte keys build");
        let taken = |i: u32| {
            self.current.as_ref().is_some_and(|k| k.local == i)
                || self.previous.as_ref().is_some_and(|k| k.local == i)
        };
        let local = random_index(taken);
        let mut out = vec![0u8; w::INITIATION_LEN];
        out[0] = w::handshake_type_byte(w::TYPE_INITIATION, random_u8());
        out[1..5].copy_from_slice(&local.to_le_bytes());
        let n = hs
            .write_message(&ts.to_be_bytes(), &mut out[5..5 + w::NOISE_INIT_LEN])
            .expect("IK message 1 fits its buffer");
        debug_assert_eq!(n, w::NOISE_INIT_LEN);
        let m1 = w::INITIATION_LEN - 2 * w::MAC_LEN;
        let mac1 = mac16(&self.server_mac1_key, &[&out[..m1]]);
        out[m1..m1 + w::MAC_LEN].copy_from_slice(&mac1);
        let mac2 = match self.cookie {
            Some((c, at)) if now.saturating_sub(at) < self.timers.cookie_valid_ms => {
                mac16(&c, &[&out[..m1 + w::MAC_LEN]])
            }
            _ => random_array(),
        };
        out[m1 + w::MAC_LEN..].copy_from_slice(&mac2);
        self.pending = Some(Pending {
            hs,
            local,
            sent_at: now,
            mac1,
            retry_now: false,
        });
        self.unanswered_since.get_or_insert(now);
        self.initiations_unanswered = self.initiations_unanswered.saturating_add(1);
        out
    }

    /// Handles one message from the server. `out` receives the keepalive to send (for
    /// [`InitiatorOutcome::Established`]) or the opened datagram (for [`InitiatorOutcome::Data`]).
    pub fn handle(&mut self, now: u64, bytes: &[u8], out: &mut Vec<u8>) -> InitiatorOutcome {
        out.clear();
        let r = match w::parse(bytes) {
            Err(e) => Err(DropReason::Malformed(e)),
            Ok(Message::Response(m)) => self.response(now, &m, out),
            Ok(Message::CookieReply(m)) => self.cookie_reply(now, &m),
            Ok(Message::Transport(m)) => self.transport(now, &m, out),
            Ok(Message::Initiation(_)) => Err(DropReason::Unexpected("initiation")),
        };
        r.unwrap_or_else(|e| {
            out.clear();
            InitiatorOutcome::Drop(e)
        })
    }

    fn response(
        &mut self,
        now: u64,
        m: &w::Response<'_>,
        out: &mut Vec<u8>,
    ) -> Result<InitiatorOutcome, DropReason> {
        if !ct_eq(&mac16(&self.own_mac1_key, &[m.mac1_covered()]), m.mac1) {
            return Err(DropReason::BadMac1);
        }
        if self.pending.as_ref().is_none_or(|p| p.local != m.receiver) {
            return Err(DropReason::NoPendingHandshake);
        }
        let mut p = self.pending.take().expect("checked above");
        let mut payload = [0u8; 64];
        match p.hs.read_message(m.noise, &mut payload) {
            Ok(0) => {}
            Ok(_) => return Err(DropReason::Handshake),
            Err(_) => {
                // snow restores its state on a failed read: a forged or corrupted response does not cancel
                // the real handshake.
                self.pending = Some(p);
                return Err(DropReason::Handshake);
            }
        }
        let state =
            p.hs.into_stateless_transport_mode()
                .map_err(|_| DropReason::Handshake)?;
        let keys = Keys {
            local: p.local,
            remote: m.sender,
            state,
            sent: 0,
            window: ReplayWindow::default(),
            born: now,
            retired: None,
        };
        if let Some(mut cur) = self.current.replace(keys) {
            cur.retired = Some(now);
            self.previous = Some(cur);
        }
        self.unanswered_since = None;
        self.initiations_unanswered = 0;
        self.silent_since = None;
        let t = self.timers;
        self.current
            .as_mut()
            .expect("just set")
            .seal(now, &t, &[], out)
            .map_err(|_| DropReason::Handshake)?;
        Ok(InitiatorOutcome::Established)
    }

    fn cookie_reply(
        &mut self,
        now: u64,
        m: &w::CookieReply<'_>,
    ) -> Result<InitiatorOutcome, DropReason> {
        let p = self
            .pending
            .as_mut()
            .filter(|p| p.local == m.receiver)
            .ok_or(DropReason::NoPendingHandshake)?;
        let aead = XChaCha20Poly1305::new((&self.cookie_key).into());
        let aad = [m.header(), &p.mac1[..]].concat();
        let mut body = [0u8; w::COOKIE_LEN];
        body.copy_from_slice(&m.sealed[..w::COOKIE_LEN]);
        let tag = chacha20poly1305::Tag::from_slice(&m.sealed[w::COOKIE_LEN..]);
        aead.decrypt_in_place_detached(XNonce::from_slice(m.nonce), &aad, &mut body, tag)
            .map_err(|_| DropReason::BadCookieReply)?;
        self.cookie = Some((body, now));
        p.retry_now = true;
        Ok(InitiatorOutcome::CookieStored)
    }

    fn transport(
        &mut self,
        now: u64,
        m: &w::Transport<'_>,
        out: &mut Vec<u8>,
    ) -> Result<InitiatorOutcome, DropReason> {
        let t = self.timers;
        let keys = [&mut self.current, &mut self.previous]
            .into_iter()
            .find_map(|s| s.as_mut().filter(|k| k.local == m.receiver))
            .ok_or(DropReason::UnknownIndex)?;
        keys.open(now, &t, m, out)?;
        self.silent_since = None;
        Ok(if out.is_empty() {
            InitiatorOutcome::Keepalive
        } else {
            InitiatorOutcome::Data
        })
    }

    /// Seals one datagram into `out`. Fails with [`SealError::NoSession`] before the first handshake
    /// completes; call [`poll`](Self::poll) after each seal to start a due rekey.
    pub fn seal(&mut self, now: u64, datagram: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let t = &self.timers;
        let k = self.current.as_mut().ok_or(SealError::NoSession)?;
        k.seal(now, t, datagram, out)?;
        self.silent_since.get_or_insert(now);
        Ok(())
    }

    /// Housekeeping: drops previous keys past their grace period and current keys past
    /// [`Timers::reject_after_ms`].
    pub fn expire(&mut self, now: u64) {
        let t = &self.timers;
        if self.previous.as_ref().is_some_and(|k| k.expired(now, t)) {
            self.previous = None;
        }
        if self.current.as_ref().is_some_and(|k| k.expired(now, t)) {
            self.current = None;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Fuzzing

/// cargo-fuzz entry point: feeds `data` to the codec, to a responder and to an initiator (fixed keys),
/// raw and with a valid mac1 patched in so the bytes reach snow. Must never panic.
pub fn fuzz_decode(data: &[u8]) {
    use std::cell::RefCell;
    thread_local! {
        static ENDS: RefCell<(NoiseResponder, NoiseInitiator, [u8; 32], [u8; 32])> = RefCell::new({
            let server = PrivateKey::from_bytes([7u8; 32]).expect("non-zero");
            let client = PrivateKey::from_bytes([9u8; 32]).expect("non-zero");
            let (sp, cp) = (server.public_key(), client.public_key());
            let rate = RateLimits { per_source_per_sec: 1_000_000, per_source_burst: 1_000_000, ..RateLimits::default() };
            let r = NoiseResponder::new(ResponderConfig { private: server, allowed: vec![cp], psk: None, timers: Timers::default(), rate });
            let i = NoiseInitiator::new(InitiatorConfig { private: client, server: sp, psk: None, timers: Timers::default() });
            (r, i, mac1_key(&sp, None), mac1_key(&cp, None))
        });
    }
    if let Ok(Message::Transport(t)) = w::parse(data) {
        assert_eq!(t.sealed.len() + w::TRANSPORT_HEADER_LEN, data.len());
    }
    ENDS.with(|e| {
        let (r, i, smac, cmac) = &mut *e.borrow_mut();
        let src: SocketAddr = "192.0.2.1:4000".parse().expect("literal");
        let now = u64::from(data.first().copied().unwrap_or(0)) * 1000;
        let mut out = Vec::new();
        let _ = r.handle(now, src, data, &mut out);
        let _ = i.handle(now, data, &mut out);
        let mut patched = data.to_vec();
        match patched.first().map(|b| b & w::TYPE_MASK) {
            Some(w::TYPE_INITIATION) if patched.len() == w::INITIATION_LEN => {
                let m = w::INITIATION_LEN - 2 * w::MAC_LEN;
                let mac = mac16(smac, &[&patched[..m]]);
                patched[m..m + w::MAC_LEN].copy_from_slice(&mac);
                let _ = r.handle(now, src, &patched, &mut out);
            }
            Some(w::TYPE_RESPONSE) if patched.len() == w::RESPONSE_LEN => {
                let m = w::RESPONSE_LEN - w::MAC_LEN;
                let mac = mac16(cmac, &[&patched[..m]]);
                patched[m..].copy_from_slice(&mac);
                if let Some(p) = &i.pending {
                    patched[5..9].copy_from_slice(&p.local.to_le_bytes());
                }
                let _ = i.handle(now, &patched, &mut out);
            }
            _ => {}
        }
        if i.pending.is_none() {
            let _ = i.initiate(now, now);
        }
    });
}

#[cfg(test)]
mod tests;
