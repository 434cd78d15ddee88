//! The optional packet guard (spec §5, `transport.kcp.guard`): a 12-byte prefix
//! `magic[4] | cookie[8]` in front of every kcp-go datagram inside the TCP payload, where
//! `cookie(win) = HMAC-SHA256(gkey, magic || win as u64be)[:8]`, `win = unix_seconds / window` and
//! `gkey = PBKDF2-HMAC-SHA256(kcp.key, "paqet_guard", 100000, 32)`. The receiver accepts the cookies of
//! windows `now − 0 ..= now − skew` and drops everything else before any decryption.
//!
//! Sans-IO like the rest of `proto`: the caller passes unix seconds. The endpoint
//! ([`crate::proto::endpoint`]) checks the prefix of every received datagram; the worker writes it on send.
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes the guard puts in front of every datagram.
pub const GUARD_LEN: usize = 12;

/// Guard settings (already validated by the config module).
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// Exactly 4 bytes (`guard_magic`, default `PQT1`).
    pub magic: [u8; 4],
    /// Window length in seconds (`guard_window`, 1..=3600).
    pub window_secs: u64,
    /// Older windows still accepted (`guard_skew`, 0..=10).
    pub skew: u64,
}

/// Guard state: the derived key and the cookies of the current windows (recomputed when the window moves).
#[derive(Clone)]
pub struct Guard {
    cfg: GuardConfig,
    gkey: [u8; 32],
    /// Window the cache was built for, and cookies for windows `cached_win - i`, `i = 0..=skew`.
    cached_win: Option<u64>,
    cookies: Vec<[u8; 8]>,
}

impl Guard {
    /// Derives the guard key from the `transport.kcp.key` string (100 000 PBKDF2 iterations: call once).
    pub fn new(cfg: GuardConfig, key: &str) -> Self {
        let mut gkey = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(key.as_bytes(), b"paqet_guard", 100_000, &mut gkey);
        Self::with_derived(cfg, gkey)
    }

    /// A guard from an already derived key (tests).
    pub fn with_derived(cfg: GuardConfig, gkey: [u8; 32]) -> Self {
        Guard {
            cfg,
            gkey,
            cached_win: None,
            cookies: Vec::new(),
        }
    }

    fn cookie(&self, win: u64) -> [u8; 8] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.gkey).expect("HMAC takes any key length");
        mac.update(&self.cfg.magic);
        mac.update(&win.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut c = [0u8; 8];
        c.copy_from_slice(&full[..8]);
        c
    }

    fn refresh(&mut self, unix_secs: u64) {
        let win = unix_secs / self.cfg.window_secs.max(1);
        if self.cached_win == Some(win) {
            return;
        }
        self.cookies.clear();
        for i in 0..=self.cfg.skew {
            match win.checked_sub(i) {
                Some(w) => {
                    let c = self.cookie(w);
                    self.cookies.push(c);
                }
                None => break,
            }
        }
        self.cached_win = Some(win);
    }

    /// Writes the prefix for "now" into `out[..GUARD_LEN]`.
    pub fn write_prefix(&mut self, unix_secs: u64, out: &mut [u8]) {
        self.refresh(unix_secs);
        out[..4].copy_from_slice(&self.cfg.magic);
        out[4..GUARD_LEN].copy_from_slice(&self.cookies[0]);
    }

    /// True if `payload` starts with a valid prefix for "now" (or up to `skew` windows back).
    pub fn check(&mut self, unix_secs: u64, payload: &[u8]) -> bool {
        if payload.len() < GUARD_LEN || payload[..4] != self.cfg.magic {
            return false;
        }
        self.refresh(unix_secs);
        let got = &payload[4..GUARD_LEN];
        self.cookies.iter().any(|c| c[..] == *got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(skew: u64) -> Guard {
        Guard::with_derived(
            GuardConfig {
                magic: *b"PQT1",
                window_secs: 30,
                skew,
            },
            [7u8; 32],
        )
    }

    #[test]
    fn prefix_round_trips_and_rejects_tampering() {
        let mut g = guard(1);
        let mut p = [0u8; GUARD_LEN + 4];
        g.write_prefix(1_000_000, &mut p);
        assert_eq!(&p[..4], b"PQT1");
        assert!(g.check(1_000_000, &p));
        for i in 0..GUARD_LEN {
            let mut q = p;
            q[i] ^= 0x01;
            assert!(!g.check(1_000_000, &q), "flipped byte {i} accepted");
        }
        assert!(!g.check(1_000_000, &p[..GUARD_LEN - 1]));
    }

    #[test]
    fn skew_accepts_previous_window_only() {
        let mut sender = guard(1);
        let mut p = [0u8; GUARD_LEN];
        sender.write_prefix(300, &mut p); // window 10
        let mut strict = guard(0);
        let mut lenient = guard(1);
        assert!(lenient.check(330, &p)); // window 11, skew 1
        assert!(!strict.check(330, &p));
        assert!(!lenient.check(360, &p)); // window 12: too old
                                          // Cookies depend on the window.
        let mut q = [0u8; GUARD_LEN];
        sender.write_prefix(330, &mut q);
        assert_ne!(p, q);
    }

    #[test]
    fn key_derivation_depends_on_key() {
        let cfg = GuardConfig {
            magic: *b"PQT1",
            window_secs: 30,
            skew: 0,
        };
        let mut a = Guard::new(cfg.clone(), "key-a");
        let mut b = Guard::new(cfg, "key-b");
        let mut p = [0u8; GUARD_LEN];
        a.write_prefix(42, &mut p);
        assert!(a.check(42, &p));
        assert!(!b.check(42, &p));
    }
}
