//! The server's replay filter: the KCP conversations (convs) of the sessions it has opened, so that a
//! recorded first datagram, replayed later from any address, never opens a session again and never
//! replaces a live one (spec §3.5 on the upstream wire, hardened without changing a byte).
//!
//! Two Bloom filters ("generations") rotate: new convs go into the current one, lookups consult both.
//! The current generation becomes the previous one after `horizon` (or earlier when it holds
//! [`BloomParams::capacity`] convs, with a warning), so a conv is remembered for at least the horizon
//! (at most twice it) unless a generation fills up first. A Bloom filter has no false negatives: a conv
//! seen within the horizon is always refused. Its false positives refuse a fresh conv of a real client
//! (which retries with another one when its session times out): with the default parameters
//! ([`BloomParams::DEFAULT`]: 2^23 bits, 20 hashes, 2^18 convs per generation) the rate is at most
//! [`BloomParams::false_positive_rate`] ≈ 2.3e-7 per generation at capacity (≈ 4.6e-7 for both) and far
//! lower below it.
//!
//! The convs are hashed with BLAKE2s keyed by a random salt kept with the filter (the file shows no conv).
//! [`ReplayFilter::encode`] / [`ReplayFilter::decode`] give the persisted form (the daemon writes it);
//! decoding checks magic, version, parameters and a SHA-256 checksum, so a corrupt or foreign file is an
//! error, never a panic. The endpoint consults the filter through [`ReplayGate`] only when a session would
//! be created or replaced (rare), so one filter behind a mutex ([`SharedReplayFilter`]) serves every
//! worker of a daemon.
use std::sync::{Arc, Mutex};

use blake2::{Blake2s256, Digest as _};
use sha2::Sha256;
use tracing::warn;

/// Default horizon: 7 days.
pub const DEFAULT_HORIZON_SECS: u64 = 7 * 24 * 3600;

const MAGIC: &[u8; 8] = b"PQDPRPL\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 8 + 16 + 2 * 16;
const CHECKSUM_LEN: usize = 32;

/// The shape of each generation's Bloom filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BloomParams {
    /// The filter has 2^bits_log2 bits.
    pub bits_log2: u32,
    /// Hash functions (bit positions) per conv.
    pub hashes: u32,
    /// Convs a generation takes before it is rotated early.
    pub capacity: u64,
}

impl BloomParams {
    /// 1 MiB per generation, 20 hashes, 262 144 convs per generation.
    pub const DEFAULT: BloomParams = BloomParams {
        bits_log2: 23,
        hashes: 20,
        capacity: 1 << 18,
    };

    fn bits(self) -> u64 {
        1u64 << self.bits_log2
    }

    /// The expected false-positive rate of one generation holding `n` convs: (1 - e^(-k n / m))^k.
    pub fn false_positive_rate_at(self, n: u64) -> f64 {
        let k = self.hashes as f64;
        let fill = 1.0 - (-k * n as f64 / self.bits() as f64).exp();
        fill.powf(k)
    }

    /// The expected false-positive rate of one generation at capacity.
    pub fn false_positive_rate(self) -> f64 {
        self.false_positive_rate_at(self.capacity)
    }

    fn valid(self) -> bool {
        (10..=32).contains(&self.bits_log2) && (1..=64).contains(&self.hashes) && self.capacity > 0
    }
}

/// Why a persisted filter was not loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayFileError {
    #[error("not a paqet-dp replay filter (bad magic or too short: {0} bytes)")]
    NotAFilter(usize),
    #[error("replay filter format version {0} (this build reads version {VERSION})")]
    Version(u32),
    #[error("replay filter parameters {0:?} differ from this build's {1:?}")]
    Params(BloomParams, BloomParams),
    #[error("replay filter length {got} bytes, expected {want}")]
    Length { got: usize, want: usize },
    #[error("replay filter checksum mismatch (corrupt file)")]
    Checksum,
}

#[derive(Clone)]
struct Generation {
    /// Unix seconds when it became the current generation.
    start: u64,
    /// Convs inserted.
    count: u64,
    bits: Vec<u64>,
}

impl Generation {
    fn empty(p: BloomParams, start: u64) -> Self {
        Generation {
            start,
            count: 0,
            bits: vec![0; (p.bits() / 64).max(1) as usize],
        }
    }

    fn test(&self, idx: &[u64]) -> bool {
        idx.iter()
            .all(|&i| self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, idx: &[u64]) {
        for &i in idx {
            self.bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        self.count += 1;
    }
}

/// Two rotating Bloom filters of the convs seen. See the module docs.
#[derive(Clone)]
pub struct ReplayFilter {
    params: BloomParams,
    horizon: u64,
    salt: [u8; 16],
    /// `[current, previous]`.
    gens: [Generation; 2],
    /// Changed since the last [`ReplayFilter::take_dirty`].
    dirty: bool,
}

impl std::fmt::Debug for ReplayFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayFilter")
            .field("params", &self.params)
            .field("horizon", &self.horizon)
            .field("current", &self.gens[0].count)
            .field("previous", &self.gens[1].count)
            .finish()
    }
}

impl ReplayFilter {
    /// An empty filter with the default parameters, a random salt, remembering convs for `horizon_secs`.
    pub fn new(horizon_secs: u64, unix_secs: u64) -> Self {
        let mut salt = [0u8; 16];
        if getrandom::getrandom(&mut salt).is_err() {
            // Only the file's opacity depends on the salt, not the filter's correctness.
            salt = rand::random();
        }
        Self::with_params(BloomParams::DEFAULT, horizon_secs, unix_secs, salt)
    }

    /// An empty filter of the given shape (`params` must be sane: 2^10..2^32 bits, 1..64 hashes).
    pub fn with_params(
        params: BloomParams,
        horizon_secs: u64,
        unix_secs: u64,
        salt: [u8; 16],
    ) -> Self {
        assert!(params.valid(), "bloom parameters {params:?}");
        ReplayFilter {
            params,
            horizon: horizon_secs.max(1),
            salt,
            gens: [
                Generation::empty(params, unix_secs),
                Generation::empty(params, unix_secs),
            ],
            dirty: false,
        }
    }

    /// The filter's shape.
    pub fn params(&self) -> BloomParams {
        self.params
    }

    /// Convs in the current and the previous generation.
    pub fn counts(&self) -> (u64, u64) {
        (self.gens[0].count, self.gens[1].count)
    }

    fn indices(&self, conv: u32) -> Vec<u64> {
        let mut h = Blake2s256::new();
        h.update(self.salt);
        h.update(conv.to_le_bytes());
        let d = h.finalize();
        let h1 = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
        let h2 = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes")) | 1;
        let mask = self.params.bits() - 1;
        (0..self.params.hashes as u64)
            .map(|i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
            .collect()
    }

    /// Rotates the generations that `unix_secs` makes due.
    fn rotate(&mut self, unix_secs: u64) {
        let age = unix_secs.saturating_sub(self.gens[0].start);
        if age >= 2 * self.horizon {
            self.gens = [
                Generation::empty(self.params, unix_secs),
                Generation::empty(self.params, unix_secs),
            ];
            self.dirty = true;
        } else if age >= self.horizon {
            self.shift(unix_secs);
        }
    }

    fn shift(&mut self, unix_secs: u64) {
        let fresh = Generation::empty(self.params, unix_secs);
        let old = std::mem::replace(&mut self.gens[0], fresh);
        self.gens[1] = old;
        self.dirty = true;
    }

    /// True if `conv` was seen (within the horizon, or a false positive).
    pub fn contains(&mut self, conv: u32, unix_secs: u64) -> bool {
        self.rotate(unix_secs);
        let idx = self.indices(conv);
        self.gens.iter().any(|g| g.test(&idx))
    }

    /// Records `conv` unless it was seen; returns true when it was new (recorded now).
    pub fn insert(&mut self, conv: u32, unix_secs: u64) -> bool {
        self.rotate(unix_secs);
        let idx = self.indices(conv);
        if self.gens.iter().any(|g| g.test(&idx)) {
            return false;
        }
        if self.gens[0].count >= self.params.capacity {
            warn!(
                capacity = self.params.capacity,
                "replay filter generation full before the horizon: rotating early (older convs forgotten \
                 sooner than server.replay_horizon)"
            );
            self.shift(unix_secs);
        }
        self.gens[0].set(&idx);
        self.dirty = true;
        true
    }

    /// Marks the filter changed again (a save failed: try again next time).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// True (once) when the filter changed since the last call: it should be saved.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The persisted form: header, both generations' bits, SHA-256 of everything before.
    pub fn encode(&self) -> Vec<u8> {
        let words = self.gens[0].bits.len();
        let mut out = Vec::with_capacity(HEADER_LEN + 2 * words * 8 + CHECKSUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.params.bits_log2.to_le_bytes());
        out.extend_from_slice(&self.params.hashes.to_le_bytes());
        out.extend_from_slice(&self.params.capacity.to_le_bytes());
        out.extend_from_slice(&self.salt);
        for g in &self.gens {
            out.extend_from_slice(&g.start.to_le_bytes());
            out.extend_from_slice(&g.count.to_le_bytes());
        }
        for g in &self.gens {
            for w in &g.bits {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Reads a filter written by [`ReplayFilter::encode`] with `params` (this build's:
    /// [`BloomParams::DEFAULT`]); rotates it to `unix_secs` with the configured `horizon_secs`.
    pub fn decode(
        bytes: &[u8],
        params: BloomParams,
        horizon_secs: u64,
        unix_secs: u64,
    ) -> Result<Self, ReplayFileError> {
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN || &bytes[..8] != MAGIC {
            return Err(ReplayFileError::NotAFilter(bytes.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(ReplayFileError::Version(version));
        }
        let stored = BloomParams {
            bits_log2: u32_at(12),
            hashes: u32_at(16),
            capacity: u64_at(20),
        };
        if stored != params || !params.valid() {
            return Err(ReplayFileError::Params(stored, params));
        }
        let words = (params.bits() / 64).max(1) as usize;
        let want = HEADER_LEN + 2 * words * 8 + CHECKSUM_LEN;
        if bytes.len() != want {
            return Err(ReplayFileError::Length {
                got: bytes.len(),
                want,
            });
        }
        let (body, sum) = bytes.split_at(want - CHECKSUM_LEN);
        if Sha256::digest(body).as_slice() != sum {
            return Err(ReplayFileError::Checksum);
        }
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&bytes[28..44]);
        let mut f = ReplayFilter::with_params(params, horizon_secs, unix_secs, salt);
        let mut off = HEADER_LEN;
        for (i, g) in f.gens.iter_mut().enumerate() {
            g.start = u64_at(44 + 16 * i);
            g.count = u64_at(52 + 16 * i);
            for w in g.bits.iter_mut() {
                *w = u64_at(off);
                off += 8;
            }
        }
        f.rotate(unix_secs);
        Ok(f)
    }
}

/// What the endpoint asks when a datagram would create or replace a session.
pub trait ReplayGate: Send + Sync {
    /// True if `conv` was already used by a session (it must not open or replace one).
    fn seen(&self, conv: u32, unix_secs: u64) -> bool;
    /// Records `conv` as used; false when it already was (check and record in one step, so two
    /// workers cannot both admit the same conv).
    fn admit(&self, conv: u32, unix_secs: u64) -> bool;
}

/// A [`ReplayFilter`] shared by the workers of a daemon.
pub type SharedReplayFilter = Arc<Mutex<ReplayFilter>>;

impl ReplayGate for Mutex<ReplayFilter> {
    fn seen(&self, conv: u32, unix_secs: u64) -> bool {
        // A worker that panicked holding the lock left a filter that is still consistent (bit sets only).
        let mut f = self.lock().unwrap_or_else(|p| p.into_inner());
        f.contains(conv, unix_secs)
    }

    fn admit(&self, conv: u32, unix_secs: u64) -> bool {
        let mut f = self.lock().unwrap_or_else(|p| p.into_inner());
        f.insert(conv, unix_secs)
    }
}

/// An in-memory filter with the default shape and horizon, for an endpoint given none.
pub fn in_memory(horizon_secs: u64, unix_secs: u64) -> SharedReplayFilter {
    Arc::new(Mutex::new(ReplayFilter::new(horizon_secs, unix_secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;
    const H: u64 = 3600;

    fn small() -> BloomParams {
        BloomParams {
            bits_log2: 16,
            hashes: 11,
            capacity: 4096,
        }
    }

    #[test]
    fn a_seen_conv_is_refused_and_a_new_one_admitted() {
        let g: SharedReplayFilter = Arc::new(Mutex::new(ReplayFilter::new(H, T0)));
        assert!(!g.seen(7, T0));
        assert!(g.admit(7, T0));
        assert!(g.seen(7, T0 + 1));
        assert!(!g.admit(7, T0 + 1), "admitted once only");
        assert!(g.admit(8, T0 + 1));
        assert_eq!(g.lock().unwrap().counts(), (2, 0));
    }

    #[test]
    fn rotation_keeps_a_conv_for_at_least_the_horizon() {
        let mut f = ReplayFilter::with_params(small(), H, T0, [3; 16]);
        assert!(f.insert(1, T0 + H - 1));
        // Rotated once at T0 + H: conv 1 now in the previous generation, still refused.
        assert!(f.contains(1, T0 + H));
        assert!(f.insert(2, T0 + H));
        assert!(f.contains(1, T0 + 2 * H - 1), "1 was inserted < 2H ago");
        // Rotated again at T0 + 2H: conv 1 (inserted before T0 + H) is forgotten, 2 is still there.
        assert!(!f.contains(1, T0 + 2 * H));
        assert!(f.contains(2, T0 + 2 * H));
        // Long silence: both generations cleared.
        assert!(!f.contains(2, T0 + 10 * H));
        assert_eq!(f.counts(), (0, 0));
    }

    #[test]
    fn a_full_generation_rotates_early() {
        let p = BloomParams {
            capacity: 4,
            ..small()
        };
        let mut f = ReplayFilter::with_params(p, H, T0, [1; 16]);
        for c in 0..4 {
            assert!(f.insert(c, T0));
        }
        assert!(f.insert(100, T0));
        assert_eq!(f.counts(), (1, 4));
        assert!(f.contains(0, T0), "still in the previous generation");
    }

    #[test]
    fn persistence_round_trip_and_bad_files() {
        let mut f = ReplayFilter::with_params(small(), H, T0, [5; 16]);
        for c in 0..100u32 {
            f.insert(c * 7919, T0 + u64::from(c));
        }
        assert!(f.take_dirty());
        assert!(!f.take_dirty());
        let bytes = f.encode();
        let mut g = ReplayFilter::decode(&bytes, small(), H, T0 + 200).expect("decodes");
        for c in 0..100u32 {
            assert!(
                g.contains(c * 7919, T0 + 200),
                "conv {c} survives a restart"
            );
        }
        assert_eq!(g.counts(), (100, 0));
        assert!(!g.contains(1, T0 + 200));
        // After the horizon the loaded filter rotates; after twice it, it is empty.
        let mut late = ReplayFilter::decode(&bytes, small(), H, T0 + H + 1).unwrap();
        assert!(late.contains(7919, T0 + H + 1));
        assert_eq!(late.counts(), (0, 100));
        let old = ReplayFilter::decode(&bytes, small(), H, T0 + 3 * H).unwrap();
        assert_eq!(old.counts(), (0, 0));
        // Corrupt and foreign inputs are errors, never panics.
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 10] ^= 0x40;
        assert_eq!(
            ReplayFilter::decode(&flipped, small(), H, T0).unwrap_err(),
            ReplayFileError::Checksum
        );
        assert!(matches!(
            ReplayFilter::decode(&bytes[..bytes.len() - 1], small(), H, T0),
            Err(ReplayFileError::Length { .. })
        ));
        assert!(matches!(
            ReplayFilter::decode(&bytes, BloomParams::DEFAULT, H, T0),
            Err(ReplayFileError::Params(..))
        ));
        assert_eq!(
            ReplayFilter::decode(b"hello", small(), H, T0).unwrap_err(),
            ReplayFileError::NotAFilter(5)
        );
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert_eq!(
            ReplayFilter::decode(&v2, small(), H, T0).unwrap_err(),
            ReplayFileError::Version(2)
        );
        for n in 0..HEADER_LEN + 40 {
            let _ = ReplayFilter::decode(&bytes[..n], small(), H, T0);
        }
    }

    #[test]
    fn measured_false_positive_rate_matches_the_formula() {
        let p = small();
        let mut f = ReplayFilter::with_params(p, H, T0, [9; 16]);
        for c in 0..p.capacity as u32 {
            f.insert(c, T0);
        }
        let probes = 200_000u32;
        let fp = (0..probes)
            .filter(|i| f.contains(0x8000_0000 + i, T0))
            .count() as f64;
        let want = p.false_positive_rate() * probes as f64;
        // (1 - e^(-11*4096/65536))^11 ≈ 4.6e-4: ≈ 92 expected.
        assert!(want > 50.0 && want < 150.0, "{want}");
        assert!(
            fp > want * 0.5 && fp < want * 1.6,
            "measured {fp} false positives, expected ≈ {want}"
        );
    }

    #[test]
    fn default_parameters_state_their_rate() {
        let p = BloomParams::DEFAULT;
        let rate = p.false_positive_rate();
        assert!(rate < 3e-7 && rate > 1e-7, "{rate}");
        assert!(p.false_positive_rate_at(1000) < 1e-40);
        // A default filter with 10 000 convs refuses none of 50 000 others.
        let mut f = ReplayFilter::new(H, T0);
        for c in 0..10_000u32 {
            f.insert(c, T0);
        }
        assert_eq!(
            (10_000..60_000u32).filter(|&c| f.contains(c, T0)).count(),
            0
        );
        assert_eq!(f.encode().len(), HEADER_LEN + 2 * (1 << 20) + CHECKSUM_LEN);
    }
}
