//! In-memory tests of the noise layer (simulated clock, no sockets).
use super::*;
use proptest::prelude::*;

const UNIX0: u64 = 1_800_000_000_000;

fn src() -> SocketAddr {
    "198.51.100.7:40000".parse().unwrap()
}

fn timers() -> Timers {
    Timers {
        rekey_after_ms: 10_000,
        reject_after_ms: 20_000,
        previous_grace_ms: 3_000,
        handshake_retry_ms: 1_000,
        silence_rekey_ms: 5_000,
        ..Timers::default()
    }
}

struct Ends {
    r: NoiseResponder,
    i: NoiseInitiator,
    client: PublicKey,
}

fn ends_with(psk_server: Option<Psk>, psk_client: Option<Psk>, rate: RateLimits) -> Ends {
    let (sk, sp) = keygen();
    let (ck, cp) = keygen();
    let r = NoiseResponder::new(ResponderConfig {
        private: sk,
        allowed: vec![cp],
        psk: psk_server,
        timers: timers(),
        rate,
    });
    let i = NoiseInitiator::new(InitiatorConfig {
        private: ck,
        server: sp,
        psk: psk_client,
        timers: timers(),
    });
    Ends { r, i, client: cp }
}

fn ends() -> Ends {
    ends_with(None, None, RateLimits::default())
}

/// Runs one handshake at `now` and the confirming keepalive; returns the initiation and response bytes.
fn handshake(e: &mut Ends, now: u64) -> (Vec<u8>, Vec<u8>) {
    let init = e.i.poll(now, UNIX0 + now).expect("an initiation is due");
    let mut resp = Vec::new();
    assert_eq!(
        e.r.handle(now, src(), &init, &mut resp),
        Outcome::Handshake { peer: e.client }
    );
    assert_eq!(resp.len(), w::RESPONSE_LEN);
    let mut ka = Vec::new();
    assert_eq!(
        e.i.handle(now, &resp, &mut ka),
        InitiatorOutcome::Established
    );
    let mut out = Vec::new();
    assert_eq!(
        e.r.handle(now, src(), &ka, &mut out),
        Outcome::Keepalive { peer: e.client }
    );
    (init, resp)
}

fn c2s(e: &mut Ends, now: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    e.i.seal(now, data, &mut out).unwrap();
    out
}

fn s2c(e: &mut Ends, now: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    e.r.seal(now, &e.client.clone(), data, &mut out).unwrap();
    out
}

fn server_gets(e: &mut Ends, now: u64, bytes: &[u8]) -> Result<Vec<u8>, DropReason> {
    let mut out = Vec::new();
    match e.r.handle(now, src(), bytes, &mut out) {
        Outcome::Data { peer } => {
            assert_eq!(peer, e.client);
            Ok(out)
        }
        Outcome::Drop(r) => {
            assert!(out.is_empty(), "a drop leaves nothing to send");
            Err(r)
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn client_gets(e: &mut Ends, now: u64, bytes: &[u8]) -> Result<Vec<u8>, DropReason> {
    let mut out = Vec::new();
    match e.i.handle(now, bytes, &mut out) {
        InitiatorOutcome::Data => Ok(out),
        InitiatorOutcome::Drop(r) => {
            assert!(out.is_empty());
            Err(r)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn handshake_then_data_both_ways() {
    let mut e = ends();
    let mut out = Vec::new();
    assert_eq!(e.i.seal(0, b"early", &mut out), Err(SealError::NoSession));
    assert!(!e.i.is_established());
    handshake(&mut e, 0);
    assert!(e.i.is_established() && e.r.has_session(&e.client));
    assert_eq!(e.r.peer_addr(&e.client), Some(src()));
    for n in 0..50u32 {
        let msg = format!("kcp datagram {n}").into_bytes();
        let sealed = c2s(&mut e, 10, &msg);
        assert_eq!(sealed.len(), msg.len() + w::TRANSPORT_OVERHEAD);
        assert_eq!(server_gets(&mut e, 10, &sealed).unwrap(), msg);
        let back = s2c(&mut e, 10, &msg);
        assert_eq!(client_gets(&mut e, 10, &back).unwrap(), msg);
    }
    // a large datagram
    let big = vec![0x5Au8; 1400];
    let sealed = c2s(&mut e, 11, &big);
    assert_eq!(server_gets(&mut e, 11, &sealed).unwrap(), big);
    // plaintext is not in the clear
    assert!(!sealed.windows(16).any(|w| w == &big[..16]));
}

#[test]
fn psk_handshake_works() {
    let psk = Psk::generate();
    let mut e = ends_with(Some(psk.clone()), Some(psk), RateLimits::default());
    handshake(&mut e, 0);
    let s = c2s(&mut e, 1, b"x");
    assert_eq!(server_gets(&mut e, 1, &s).unwrap(), b"x");
}

#[test]
fn wrong_server_key_gets_no_reply() {
    let mut e = ends();
    let (ck, _) = keygen();
    let (_, other_server) = keygen();
    // the client's key is allowed, but it believes in another server key
    let mut i = NoiseInitiator::new(InitiatorConfig {
        private: ck,
        server: other_server,
        psk: None,
        timers: timers(),
    });
    let init = i.poll(0, UNIX0).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        e.r.handle(0, src(), &init, &mut out),
        Outcome::Drop(DropReason::BadMac1)
    );
    assert!(out.is_empty());
    // even with mac1 made right by someone who knows our public key, the Noise handshake fails
    let m = w::INITIATION_LEN - 2 * w::MAC_LEN;
    let mut forged = init.clone();
    let mac = mac16(&mac1_key(&e.r.public_key(), None), &[&forged[..m]]);
    forged[m..m + 16].copy_from_slice(&mac);
    assert_eq!(
        e.r.handle(0, src(), &forged, &mut out),
        Outcome::Drop(DropReason::Handshake)
    );
    assert!(out.is_empty());
}

#[test]
fn unknown_client_key_gets_no_reply() {
    let mut e = ends();
    let (stranger, _) = keygen();
    let mut i = NoiseInitiator::new(InitiatorConfig {
        private: stranger,
        server: e.r.public_key(),
        psk: None,
        timers: timers(),
    });
    let init = i.poll(0, UNIX0).unwrap();
    let mut out = Vec::new();
    let got = e.r.handle(0, src(), &init, &mut out);
    assert_eq!(got, Outcome::Drop(DropReason::UnknownPeer(i.public_key())));
    assert!(out.is_empty());
}

#[test]
fn wrong_or_missing_psk_gets_no_reply() {
    for (s, c) in [
        (Some(Psk::generate()), Some(Psk::generate())),
        (Some(Psk::generate()), None),
        (None, Some(Psk::generate())),
    ] {
        let mut e = ends_with(s, c, RateLimits::default());
        let init = e.i.poll(0, UNIX0).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            e.r.handle(0, src(), &init, &mut out),
            Outcome::Drop(DropReason::BadMac1)
        );
        assert!(out.is_empty());
    }
}

#[test]
fn replayed_initiation_gets_no_reply() {
    let mut e = ends();
    let old = e.i.initiate(0, UNIX0);
    let new = e.i.initiate(1, UNIX0 + 1);
    let mut out = Vec::new();
    assert_eq!(
        e.r.handle(1, src(), &new, &mut out),
        Outcome::Handshake { peer: e.client }
    );
    // the same bytes again, and an older initiation, are refused without an answer
    assert_eq!(
        e.r.handle(2, src(), &new, &mut out),
        Outcome::Drop(DropReason::ReplayedInitiation)
    );
    assert!(out.is_empty());
    assert_eq!(
        e.r.handle(2, src(), &old, &mut out),
        Outcome::Drop(DropReason::ReplayedInitiation)
    );
    // the client's clock going backwards does not make its timestamps go backwards
    let back = e.i.initiate(3, UNIX0 - 50_000);
    assert_eq!(
        e.r.handle(3, src(), &back, &mut out),
        Outcome::Handshake { peer: e.client }
    );
}

#[test]
fn replayed_response_is_refused() {
    let mut e = ends();
    let (_, resp) = handshake(&mut e, 0);
    let mut out = Vec::new();
    assert_eq!(
        e.i.handle(1, &resp, &mut out),
        InitiatorOutcome::Drop(DropReason::NoPendingHandshake)
    );
}

#[test]
fn transport_replay_reorder_and_age() {
    let mut e = ends();
    handshake(&mut e, 0);
    let n = REPLAY_WINDOW as usize + 200;
    let sealed: Vec<Vec<u8>> = (0..n)
        .map(|k| c2s(&mut e, 1, &(k as u32).to_le_bytes()))
        .collect();
    // delivered in reverse order within the window: all accepted, once
    for k in (0..100).rev() {
        assert_eq!(
            server_gets(&mut e, 1, &sealed[k]).unwrap(),
            (k as u32).to_le_bytes()
        );
    }
    for (k, dup) in sealed.iter().enumerate().take(100) {
        assert_eq!(
            server_gets(&mut e, 1, dup),
            Err(DropReason::Replay),
            "duplicate {k}"
        );
    }
    // jump to the newest: counters more than REPLAY_WINDOW behind it are too old, the rest still open
    assert!(server_gets(&mut e, 1, &sealed[n - 1]).is_ok());
    let edge = n - 1 - REPLAY_WINDOW as usize;
    assert_eq!(
        server_gets(&mut e, 1, &sealed[edge]),
        Err(DropReason::TooOld)
    );
    assert_eq!(
        server_gets(&mut e, 1, &sealed[150]),
        Err(DropReason::TooOld)
    );
    assert!(server_gets(&mut e, 1, &sealed[edge + 1]).is_ok());
    assert!(server_gets(&mut e, 1, &sealed[n - 2]).is_ok());
    assert_eq!(
        server_gets(&mut e, 1, &sealed[n - 2]),
        Err(DropReason::Replay)
    );
    const { assert!(REPLAY_WINDOW >= 2048) };
}

#[test]
fn replay_window_unit() {
    let mut w = ReplayWindow::default();
    assert!(w.check(0).is_ok());
    w.accept(5);
    assert!(w.check(0).is_ok() && w.check(4).is_ok() && w.check(6).is_ok());
    assert_eq!(w.check(5), Err(DropReason::Replay));
    // a huge jump clears everything behind
    w.accept(1 << 40);
    assert_eq!(w.check(5), Err(DropReason::TooOld));
    assert!(w.check((1 << 40) - 1).is_ok());
    assert_eq!(w.check(1 << 40), Err(DropReason::Replay));
    // bits reused after wrapping around the ring are clear
    let base = 1u64 << 40;
    for k in 1..=(3 * ReplayWindow::BITS) {
        assert!(w.check(base + k).is_ok(), "{k}");
        w.accept(base + k);
    }
    for k in 0..REPLAY_WINDOW {
        let c = base + 3 * ReplayWindow::BITS - k;
        assert_eq!(w.check(c), Err(DropReason::Replay), "{k}");
    }
    assert_eq!(w.check(u64::MAX - 1), Ok(()));
    assert_eq!(w.check(u64::MAX), Err(DropReason::Replay));
    w.accept(u64::MAX - 1);
    assert_eq!(w.check(u64::MAX - 1), Err(DropReason::Replay));
}

fn flip_each_bit(bytes: &[u8], skip: std::ops::Range<usize>, mut f: impl FnMut(&[u8])) {
    for i in 0..bytes.len() {
        if skip.contains(&i) {
            continue;
        }
        for bit in 0..8 {
            let mut b = bytes.to_vec();
            b[i] ^= 1 << bit;
            f(&b);
        }
    }
}

#[test]
fn bit_flips_anywhere_are_refused() {
    let mut e = ends();
    // initiation: every bit except mac2 (random without a cookie, checked only under load; see below)
    let init = e.i.poll(0, UNIX0).unwrap();
    let mac2 = w::INITIATION_LEN - w::MAC_LEN..w::INITIATION_LEN;
    let mut out = Vec::new();
    flip_each_bit(&init, mac2, |b| {
        assert!(matches!(
            e.r.handle(0, src(), b, &mut out),
            Outcome::Drop(_)
        ));
        assert!(out.is_empty());
    });
    // response: every bit, and the real one still completes afterwards
    let mut resp = Vec::new();
    assert!(matches!(
        e.r.handle(0, src(), &init, &mut resp),
        Outcome::Handshake { .. }
    ));
    flip_each_bit(&resp, 0..0, |b| {
        assert!(matches!(
            e.i.handle(0, b, &mut out),
            InitiatorOutcome::Drop(_)
        ));
    });
    assert_eq!(
        e.i.handle(0, &resp, &mut out),
        InitiatorOutcome::Established
    );
    let ka = out.clone();
    assert!(matches!(
        e.r.handle(0, src(), &ka, &mut out),
        Outcome::Keepalive { .. }
    ));
    // transport, both directions
    let c = c2s(&mut e, 1, b"hello server");
    flip_each_bit(&c, 0..0, |b| assert!(server_gets(&mut e, 1, b).is_err()));
    assert_eq!(server_gets(&mut e, 1, &c).unwrap(), b"hello server");
    let s = s2c(&mut e, 1, b"hello client");
    flip_each_bit(&s, 0..0, |b| assert!(client_gets(&mut e, 1, b).is_err()));
    assert_eq!(client_gets(&mut e, 1, &s).unwrap(), b"hello client");
    // truncations and extensions
    for cut in 0..c.len() {
        assert!(server_gets(&mut e, 1, &c[..cut]).is_err());
    }
    let mut longer = s2c(&mut e, 1, b"x");
    longer.push(0);
    assert!(client_gets(&mut e, 1, &longer).is_err());
}

fn loaded() -> RateLimits {
    // one initiation ever without a cookie, then the server is under load
    RateLimits {
        global_per_sec: 0,
        global_burst: 1,
        ..RateLimits::default()
    }
}

#[test]
fn cookie_round_trip_under_load() {
    let mut e = ends_with(None, None, loaded());
    handshake(&mut e, 0);
    // rekey while the server is under load: the first initiation gets a cookie reply, not a response
    let init = e.i.poll(10_000, UNIX0 + 10_000).expect("rekey due");
    let mut reply = Vec::new();
    assert_eq!(e.r.handle(10_000, src(), &init, &mut reply), Outcome::Reply);
    assert_eq!(reply.len(), w::COOKIE_REPLY_LEN);
    assert!(reply.len() < init.len(), "no amplification");
    // the cookie is bound to the source: bit flips and other sources are refused
    let mut out = Vec::new();
    flip_each_bit(&reply, 0..0, |b| {
        assert!(matches!(
            e.i.handle(10_000, b, &mut out),
            InitiatorOutcome::Drop(_)
        ))
    });
    assert_eq!(
        e.i.handle(10_000, &reply, &mut out),
        InitiatorOutcome::CookieStored
    );
    assert_eq!(e.i.poll_at(), Some(0));
    let retry =
        e.i.poll(10_001, UNIX0 + 10_001)
            .expect("retry right after a cookie");
    let other: SocketAddr = "198.51.100.8:40000".parse().unwrap();
    let mut resp = Vec::new();
    assert_eq!(
        e.r.handle(10_001, other, &retry, &mut resp),
        Outcome::Reply,
        "cookie is bound to the address"
    );
    // a flipped mac2 is not accepted under load
    let mut bad = retry.clone();
    bad[w::INITIATION_LEN - 1] ^= 1;
    assert_eq!(e.r.handle(10_001, src(), &bad, &mut resp), Outcome::Reply);
    assert_eq!(
        e.r.handle(10_001, src(), &retry, &mut resp),
        Outcome::Handshake { peer: e.client }
    );
    assert_eq!(
        e.i.handle(10_001, &resp, &mut out),
        InitiatorOutcome::Established
    );
    // a cookie reply for no pending handshake is dropped
    assert_eq!(
        e.i.handle(10_002, &reply, &mut out),
        InitiatorOutcome::Drop(DropReason::NoPendingHandshake)
    );
}

#[test]
fn cookie_reply_only_after_mac1() {
    let mut e = ends_with(None, None, loaded());
    handshake(&mut e, 0);
    let mut junk = e.i.initiate(1, UNIX0 + 1);
    junk[10] ^= 1; // breaks mac1
    let mut out = Vec::new();
    assert_eq!(
        e.r.handle(1, src(), &junk, &mut out),
        Outcome::Drop(DropReason::BadMac1)
    );
    assert!(out.is_empty());
}

#[test]
fn initiations_are_rate_limited_per_source() {
    let rate = RateLimits {
        per_source_per_sec: 2,
        per_source_burst: 2,
        ..RateLimits::default()
    };
    let mut e = ends_with(None, None, rate);
    let mut out = Vec::new();
    for k in 0..2 {
        let init = e.i.initiate(0, UNIX0 + k);
        assert!(matches!(
            e.r.handle(0, src(), &init, &mut out),
            Outcome::Handshake { .. }
        ));
    }
    let init = e.i.initiate(0, UNIX0 + 2);
    assert_eq!(
        e.r.handle(0, src(), &init, &mut out),
        Outcome::Drop(DropReason::RateLimited)
    );
    assert!(out.is_empty());
    // another source (another IP) is not affected, and the bucket refills (2 per second)
    let other: SocketAddr = "203.0.113.9:1".parse().unwrap();
    assert!(matches!(
        e.r.handle(0, other, &init, &mut out),
        Outcome::Handshake { .. }
    ));
    let init = e.i.initiate(400, UNIX0 + 400);
    assert_eq!(
        e.r.handle(400, src(), &init, &mut out),
        Outcome::Drop(DropReason::RateLimited)
    );
    let init = e.i.initiate(500, UNIX0 + 500);
    assert!(matches!(
        e.r.handle(500, src(), &init, &mut out),
        Outcome::Handshake { .. }
    ));
    // expire() forgets sources whose bucket refilled
    e.r.expire(10_000);
    assert!(e.r.sources.is_empty());
}

#[test]
fn source_table_is_bounded() {
    let rate = RateLimits {
        per_source_per_sec: 1,
        per_source_burst: 1,
        max_sources: 2,
        ..RateLimits::default()
    };
    let mut e = ends_with(None, None, rate);
    let mut out = Vec::new();
    for (k, a) in ["192.0.2.1:1", "192.0.2.2:1", "192.0.2.3:1"]
        .iter()
        .enumerate()
    {
        let init = e.i.initiate(0, UNIX0 + k as u64);
        let got = e.r.handle(0, a.parse().unwrap(), &init, &mut out);
        if k < 2 {
            assert!(matches!(got, Outcome::Handshake { .. }));
        } else {
            assert_eq!(got, Outcome::Drop(DropReason::RateLimited));
        }
    }
    assert_eq!(e.r.sources.len(), 2);
}

#[test]
fn rekey_with_datagrams_in_flight() {
    let mut e = ends();
    handshake(&mut e, 0);
    assert!(
        e.i.poll(9_999, UNIX0 + 9_999).is_none(),
        "no rekey before rekey_after_ms"
    );
    let s_old = s2c(&mut e, 9_000, b"s1 old keys");
    let c_old = c2s(&mut e, 9_000, b"c1 old keys");
    // time budget reached: the client starts a new handshake
    let init = e.i.poll(10_000, UNIX0 + 10_000).expect("rekey due");
    let mut resp = Vec::new();
    assert_eq!(
        e.r.handle(10_000, src(), &init, &mut resp),
        Outcome::Handshake { peer: e.client }
    );
    // until the client uses the new keys, the server keeps sealing with the old ones
    let s_mid = s2c(&mut e, 10_001, b"s2 still old");
    let mut ka = Vec::new();
    assert_eq!(
        e.i.handle(10_002, &resp, &mut ka),
        InitiatorOutcome::Established
    );
    let c_new = c2s(&mut e, 10_003, b"c2 new keys");
    // reordered: new-key datagram first, then the in-flight old ones
    assert_eq!(server_gets(&mut e, 10_004, &c_new).unwrap(), b"c2 new keys");
    assert_eq!(server_gets(&mut e, 10_004, &c_old).unwrap(), b"c1 old keys");
    let s_new = s2c(&mut e, 10_005, b"s3 new keys");
    assert_ne!(s_new[1..5], s_old[1..5], "new session, new receiver index");
    assert_eq!(client_gets(&mut e, 10_006, &s_new).unwrap(), b"s3 new keys");
    assert_eq!(client_gets(&mut e, 10_006, &s_old).unwrap(), b"s1 old keys");
    assert_eq!(
        client_gets(&mut e, 10_006, &s_mid).unwrap(),
        b"s2 still old"
    );
    // the late keepalive is fine too (the new keys are already current)
    let mut out = Vec::new();
    assert_eq!(
        e.r.handle(10_007, src(), &ka, &mut out),
        Outcome::Keepalive { peer: e.client }
    );
    // a replayed old-key datagram is still refused during the grace period
    assert_eq!(server_gets(&mut e, 10_010, &c_old), Err(DropReason::Replay));
    // after the grace period the old keys open nothing, and expire() forgets them
    assert_eq!(
        client_gets(&mut e, 13_100, &s_mid),
        Err(DropReason::Expired)
    );
    assert_eq!(
        server_gets(&mut e, 13_100, &c_old),
        Err(DropReason::Expired)
    );
    e.i.expire(13_100);
    assert!(
        e.r.expire(13_100).is_empty(),
        "the peer still has current keys"
    );
    assert_eq!(
        client_gets(&mut e, 13_100, &s_mid),
        Err(DropReason::UnknownIndex)
    );
    assert_eq!(
        server_gets(&mut e, 13_100, &c_old),
        Err(DropReason::UnknownIndex)
    );
    let c = c2s(&mut e, 13_200, b"after");
    assert_eq!(server_gets(&mut e, 13_200, &c).unwrap(), b"after");
}

#[test]
fn rekey_after_message_budget_and_silence() {
    let mut e = ends();
    e.i.timers.rekey_after_messages = 4; // the keepalive after the handshake is the first
    handshake(&mut e, 0);
    for _ in 0..3 {
        assert!(e.i.poll(1, UNIX0 + 1).is_none());
        let c = c2s(&mut e, 1, b"m");
        server_gets(&mut e, 1, &c).unwrap();
        let s = s2c(&mut e, 1, b"r");
        client_gets(&mut e, 1, &s).unwrap();
    }
    assert!(e.i.poll(1, UNIX0 + 1).is_some(), "message budget reached");

    let mut e = ends();
    handshake(&mut e, 0);
    let _lost = c2s(&mut e, 100, b"never answered");
    assert!(e.i.poll(5_099, UNIX0 + 5_099).is_none());
    assert_eq!(e.i.poll_at(), Some(5_100));
    assert!(
        e.i.poll(5_100, UNIX0 + 5_100).is_some(),
        "silence since the first unanswered datagram"
    );
}

#[test]
fn unanswered_initiations_are_retried_and_reported() {
    let mut e = ends();
    assert_eq!(e.i.unanswered(0), None);
    assert!(e.i.poll(0, UNIX0).is_some());
    assert!(e.i.poll(999, UNIX0 + 999).is_none());
    assert_eq!(e.i.poll_at(), Some(1_000));
    let second = e.i.poll(1_000, UNIX0 + 1_000).expect("retry");
    assert!(e.i.poll(1_500, UNIX0 + 1_500).is_none());
    assert_eq!(e.i.unanswered(20_000), Some((20_000, 2)));
    // a response to the newest initiation completes; the report clears
    let mut resp = Vec::new();
    assert!(matches!(
        e.r.handle(20_000, src(), &second, &mut resp),
        Outcome::Handshake { .. }
    ));
    let mut ka = Vec::new();
    assert_eq!(
        e.i.handle(20_000, &resp, &mut ka),
        InitiatorOutcome::Established
    );
    assert_eq!(e.i.unanswered(20_000), None);
}

#[test]
fn response_to_a_superseded_initiation_is_dropped() {
    let mut e = ends();
    let first = e.i.poll(0, UNIX0).unwrap();
    let mut resp = Vec::new();
    assert!(matches!(
        e.r.handle(0, src(), &first, &mut resp),
        Outcome::Handshake { .. }
    ));
    let _second = e.i.poll(1_000, UNIX0 + 1_000).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        e.i.handle(1_000, &resp, &mut out),
        InitiatorOutcome::Drop(DropReason::NoPendingHandshake)
    );
}

#[test]
fn keys_expire_without_rekey() {
    let mut e = ends();
    handshake(&mut e, 0);
    let mut out = Vec::new();
    assert_eq!(
        e.r.seal(20_000, &e.client.clone(), b"x", &mut out),
        Err(SealError::Expired)
    );
    assert_eq!(e.i.seal(20_000, b"x", &mut out), Err(SealError::Expired));
    let c = {
        let mut v = Vec::new();
        e.i.current.as_mut().unwrap().born = 1; // seal just before expiry
        e.i.seal(19_999, b"late", &mut v).unwrap();
        v
    };
    assert_eq!(server_gets(&mut e, 20_000, &c), Err(DropReason::Expired));
    assert_eq!(e.r.expire(20_000), vec![e.client]);
    assert_eq!(
        e.r.seal(20_000, &e.client.clone(), b"x", &mut out),
        Err(SealError::NoSession)
    );
    e.i.expire(20_001);
    assert!(!e.i.is_established());
    assert!(e.i.poll(20_001, UNIX0 + 20_001).is_some());
}

#[test]
fn forward_secrecy_structure() {
    let mut e = ends();
    let (init1, resp1) = handshake(&mut e, 0);
    let c1 = c2s(&mut e, 1, b"same plaintext");
    let (init2, resp2) = handshake(&mut e, 10_000);
    let c2 = c2s(&mut e, 10_001, b"same plaintext");
    // fresh ephemeral keys on both sides, for every handshake
    assert_ne!(init1[5..37], init2[5..37], "client ephemeral");
    assert_ne!(resp1[9..41], resp2[9..41], "server ephemeral");
    // the static keys never appear in the clear
    for m in [&init1, &init2] {
        assert!(
            !m.windows(32).any(|w| w == e.client.0),
            "client static key in clear"
        );
        assert!(
            !m.windows(32).any(|w| w == e.r.public_key().0),
            "server static key in clear"
        );
    }
    // the same counter (0) and plaintext under the two sessions give unrelated ciphertexts
    assert_eq!(c1[5..13], c2[5..13]);
    assert_ne!(c1[13..], c2[13..]);
    // and a datagram of session 1 re-addressed to session 2 does not open
    let mut moved = c1.clone();
    moved[1..5].copy_from_slice(&c2[1..5]);
    w::finish_transport(&mut moved);
    assert_eq!(
        server_gets(&mut e, 10_002, &moved),
        Err(DropReason::Decrypt)
    );
}

#[test]
fn messages_carry_no_constant_bytes() {
    // byte 0: two type bits, six bits that vary; no reserved zeros anywhere
    let mut seen_init = std::collections::HashSet::new();
    let mut seen_tr = std::collections::HashSet::new();
    let mut e = ends();
    for k in 0..64 {
        let i = e.i.initiate(k, UNIX0 + k);
        assert_eq!(i[0] & w::TYPE_MASK, w::TYPE_INITIATION);
        seen_init.insert(i[0]);
    }
    let mut e = ends();
    handshake(&mut e, 100);
    for _ in 0..64 {
        let c = c2s(&mut e, 101, b"d");
        assert_eq!(c[0] & w::TYPE_MASK, w::TYPE_TRANSPORT);
        seen_tr.insert(c[0]);
    }
    assert!(
        seen_init.len() > 20 && seen_tr.len() > 20,
        "{} {}",
        seen_init.len(),
        seen_tr.len()
    );
}

#[test]
fn unexpected_directions_are_dropped() {
    let mut e = ends();
    let (init, resp) = handshake(&mut e, 0);
    let mut out = Vec::new();
    assert_eq!(
        e.r.handle(1, src(), &resp, &mut out),
        Outcome::Drop(DropReason::Unexpected("response"))
    );
    assert_eq!(
        e.i.handle(1, &init, &mut out),
        InitiatorOutcome::Drop(DropReason::Unexpected("initiation"))
    );
    // a datagram the client sealed does not open at the client (directions have separate keys)
    let c = c2s(&mut e, 1, b"to server");
    assert!(client_gets(&mut e, 1, &c).is_err());
}

#[test]
fn key_text_round_trip_and_errors() {
    let (k, p) = keygen();
    assert_eq!(k.to_text().len(), KEY_TEXT_LEN);
    assert_eq!(PrivateKey::parse(&k.to_text()).unwrap(), k);
    assert_eq!(PublicKey::parse(&format!("  {p}\n")).unwrap(), p);
    assert_eq!(p.to_string().parse::<PublicKey>().unwrap(), p);
    assert_eq!(PrivateKey::parse(&k.to_text()).unwrap().public_key(), p);
    let psk = Psk::generate();
    assert_eq!(Psk::parse(&psk.to_text()).unwrap(), psk);
    assert_eq!(PublicKey::parse(""), Err(KeyError::Empty));
    assert_eq!(PublicKey::parse("abc"), Err(KeyError::Length(3)));
    let mut bad = p.to_text();
    bad.replace_range(0..1, "*");
    assert!(matches!(PublicKey::parse(&bad), Err(KeyError::Base64(_))));
    let zero = key_text(&[0u8; 32]);
    assert_eq!(PrivateKey::parse(&zero), Err(KeyError::Zero));
    assert!(PublicKey::parse(&zero).is_ok());
    for e in [KeyError::Empty, KeyError::Length(3), KeyError::Zero] {
        assert!(e.to_string().contains("key"), "{e}");
    }
    // secrets are not printed
    assert!(!format!("{k:?}").contains(&k.to_text()));
    assert!(!format!("{psk:?}").contains(&psk.to_text()));
    // keys differ per keygen
    assert_ne!(keygen().1, keygen().1);
}

#[test]
fn public_key_derivation_matches_snow() {
    let kp = Builder::new(params(false)).generate_keypair().unwrap();
    let k = PrivateKey::from_bytes(kp.private.as_slice().try_into().unwrap()).unwrap();
    assert_eq!(k.public_key().0[..], kp.public[..]);
}

#[test]
fn drop_labels_are_distinct() {
    let all = [
        DropReason::Malformed(w::NoiseWireError::Empty),
        DropReason::BadMac1,
        DropReason::RateLimited,
        DropReason::Handshake,
        DropReason::UnknownPeer(PublicKey([0; 32])),
        DropReason::ReplayedInitiation,
        DropReason::Unexpected("x"),
        DropReason::NoPendingHandshake,
        DropReason::BadCookieReply,
        DropReason::UnknownIndex,
        DropReason::Expired,
        DropReason::Replay,
        DropReason::TooOld,
        DropReason::Decrypt,
    ];
    let labels: std::collections::HashSet<_> = all.iter().map(|d| d.label()).collect();
    assert_eq!(labels.len(), all.len());
}

#[test]
fn fuzz_entry_runs() {
    for n in [0usize, 1, 28, 29, 61, 73, 141, 200] {
        for t in 0..4u8 {
            let mut d = vec![0x33u8; n];
            if let Some(b) = d.first_mut() {
                *b = 0x40 | t;
            }
            fuzz_decode(&d);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_get_an_answer(b in proptest::collection::vec(any::<u8>(), 0..300), t in 0u8..4) {
        let mut e = ends();
        let mut b = b;
        if let Some(x) = b.first_mut() {
            *x = (*x & !w::TYPE_MASK) | t;
        }
        let mut out = Vec::new();
        prop_assert!(matches!(e.r.handle(0, src(), &b, &mut out), Outcome::Drop(_)));
        prop_assert!(out.is_empty());
        let _ = e.i.poll(0, UNIX0);
        prop_assert!(matches!(e.i.handle(0, &b, &mut out), InitiatorOutcome::Drop(_)));
        prop_assert!(out.is_empty());
        fuzz_decode(&b);
    }

    #[test]
    fn random_bytes_after_handshake_are_dropped(b in proptest::collection::vec(any::<u8>(), 29..200), idx in any::<bool>()) {
        let mut e = ends();
        handshake(&mut e, 0);
        let mut b = b;
        if idx {
            // aim at a live session index so the AEAD check is what refuses it
            let live = c2s(&mut e, 1, b"x");
            b[1..5].copy_from_slice(&live[1..5]);
        }
        let last = *b.last().unwrap();
        b[0] = w::transport_type_byte(last);
        prop_assert!(server_gets(&mut e, 1, &b).is_err());
        prop_assert!(client_gets(&mut e, 1, &b).is_err());
    }
}

/// What an upstream peer and a noise peer make of each other's datagrams (codec level; the e2e test of the
/// wiring step checks the same against real processes).
#[test]
fn upstream_and_noise_ignore_each_other() {
    use crate::wire::crypt::{BlockMode, Crypto};
    let mut e = ends();
    let (init, resp) = handshake(&mut e, 0);
    let tr = c2s(&mut e, 1, &[0x51; 120]);
    let mut rng_body = 0x1234_5678u32;
    for mode in BlockMode::ALL {
        let mut c = Crypto::new(mode, "upstream key").unwrap();
        // an upstream datagram (a kcp-looking body) meets both noise ends: dropped, nothing sent back
        for len in [24usize, 80, 200] {
            let mut buf = vec![0u8; c.overhead() + len];
            for b in &mut buf[c.header_len()..c.header_len() + len] {
                rng_body = rng_body.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *b = (rng_body >> 16) as u8;
            }
            let n = c.seal(&mut buf, len).unwrap();
            let mut out = Vec::new();
            assert!(
                matches!(e.r.handle(2, src(), &buf[..n], &mut out), Outcome::Drop(_)),
                "{mode:?}"
            );
            assert!(out.is_empty());
            assert!(
                matches!(
                    e.i.handle(2, &buf[..n], &mut out),
                    InitiatorOutcome::Drop(_)
                ),
                "{mode:?}"
            );
        }
        // noise messages meet kcp-go's crypto check: refused by every mode that checks anything
        if mode != BlockMode::Null {
            for m in [&init, &resp, &tr] {
                let mut pkt = m.clone();
                assert!(
                    c.open(&mut pkt).is_err(),
                    "{mode:?} accepted a noise message"
                );
            }
        }
    }
}

/// Two connections of one client key (two source ports, as `transport.conn = 2` makes) keep separate
/// keys on the server: each is sealed to and opened on its own, and one expiring leaves the other.
#[test]
fn one_client_key_two_connections() {
    let (sk, sp) = keygen();
    let (ck, cp) = keygen();
    let mut r = NoiseResponder::new(ResponderConfig {
        private: sk,
        allowed: vec![cp],
        psk: None,
        timers: timers(),
        rate: RateLimits::default(),
    });
    let icfg = InitiatorConfig {
        private: ck,
        server: sp,
        psk: None,
        timers: timers(),
    };
    let mut conns = [NoiseInitiator::new(icfg.clone()), NoiseInitiator::new(icfg)];
    let addrs: [SocketAddr; 2] = [
        "198.51.100.7:40000".parse().unwrap(),
        "198.51.100.7:40001".parse().unwrap(),
    ];
    for (k, (i, a)) in conns.iter_mut().zip(addrs).enumerate() {
        // the client gives each initiation a newer timestamp (one key, one clock)
        let init = i.poll(0, UNIX0 + k as u64).unwrap();
        let mut resp = Vec::new();
        assert_eq!(
            r.handle(0, a, &init, &mut resp),
            Outcome::Handshake { peer: cp }
        );
        let mut ka = Vec::new();
        assert_eq!(i.handle(0, &resp, &mut ka), InitiatorOutcome::Established);
        let mut out = Vec::new();
        assert_eq!(
            r.handle(0, a, &ka, &mut out),
            Outcome::Keepalive { peer: cp }
        );
    }
    for (k, a) in addrs.into_iter().enumerate() {
        assert!(r.has_session_at(&cp, a));
        let msg = format!("to connection {k}").into_bytes();
        let mut sealed = Vec::new();
        r.seal_to(10, &cp, a, &msg, &mut sealed).unwrap();
        let mut got = Vec::new();
        assert_eq!(
            conns[k].handle(10, &sealed, &mut got),
            InitiatorOutcome::Data
        );
        assert_eq!(got, msg);
        // the other connection cannot open it
        assert!(matches!(
            conns[1 - k].handle(10, &sealed, &mut got),
            InitiatorOutcome::Drop(_)
        ));
        let mut up = Vec::new();
        conns[k].seal(10, b"up", &mut up).unwrap();
        assert_eq!(r.handle(10, a, &up, &mut got), Outcome::Data { peer: cp });
        assert_eq!(got, b"up");
    }
    // connection 1 rekeys later; at 20 s connection 0's keys expire, connection 1's stay
    let init = conns[1].initiate(15_000, UNIX0 + 15_000);
    let mut resp = Vec::new();
    assert_eq!(
        r.handle(15_000, addrs[1], &init, &mut resp),
        Outcome::Handshake { peer: cp }
    );
    let (gone, gone_sessions) = r.expire_sessions(20_000);
    assert!(gone.is_empty());
    assert_eq!(gone_sessions, vec![(cp, addrs[0])]);
    assert!(!r.has_session_at(&cp, addrs[0]) && r.has_session_at(&cp, addrs[1]));
}
