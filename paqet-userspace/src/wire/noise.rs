//! Codec of the opt-in authenticated paqet-dp wire ("noise"; `docs/protocol-extensions.md` has the byte map).
//!
//! Four messages, told apart by the two low bits of byte 0 (the six high bits carry no constant: random in
//! handshake messages, copied from the AEAD tag in transport messages) and by their exact length:
//!
//! | message      | len      | layout                                                                      |
//! |--------------|----------|-----------------------------------------------------------------------------|
//! | transport    | ≥ 29     | `t u8 \| receiver u32le \| counter u64le \| AEAD(datagram) + tag16`          |
//! | initiation   | 141      | `t u8 \| sender u32le \| noise msg1 (104) \| mac1 16 \| mac2 16`             |
//! | response     | 73       | `t u8 \| sender u32le \| receiver u32le \| noise msg2 (48) \| mac1 16`       |
//! | cookie reply | 61       | `t u8 \| receiver u32le \| nonce 24 \| AEAD(cookie 16) + tag16`             |
//!
//! This module only splits bytes into checked views and assembles headers; the cryptography (snow, macs,
//! cookies, replay windows) lives in [`crate::proto::noise`]. Nothing here panics on untrusted bytes.

use thiserror::Error;

/// Mask of the message-type bits in byte 0.
pub const TYPE_MASK: u8 = 0b11;
/// Type of a transport message (one sealed kcp datagram).
pub const TYPE_TRANSPORT: u8 = 0;
/// Type of a handshake initiation (client → server).
pub const TYPE_INITIATION: u8 = 1;
/// Type of a handshake response (server → client).
pub const TYPE_RESPONSE: u8 = 2;
/// Type of a cookie reply (server → client, under load).
pub const TYPE_COOKIE_REPLY: u8 = 3;

/// Length of a mac1 / mac2 field (keyed BLAKE2s, 128-bit output).
pub const MAC_LEN: usize = 16;
/// Length of an AEAD tag (ChaCha20-Poly1305 / XChaCha20-Poly1305).
pub const TAG_LEN: usize = 16;
/// Length of an X25519 public key.
pub const KEY_LEN: usize = 32;
/// Length of the initiation payload: the client's timestamp, unix milliseconds, u64 big-endian.
pub const TIMESTAMP_LEN: usize = 8;
/// Length of the Noise IK first message: `e` (32) + encrypted `s` (32 + 16) + encrypted timestamp (8 + 16).
pub const NOISE_INIT_LEN: usize = KEY_LEN + KEY_LEN + TAG_LEN + TIMESTAMP_LEN + TAG_LEN;
/// Length of the Noise IK second message: `e` (32) + encrypted empty payload (16).
pub const NOISE_RESP_LEN: usize = KEY_LEN + TAG_LEN;
/// Length of an initiation.
pub const INITIATION_LEN: usize = 1 + 4 + NOISE_INIT_LEN + MAC_LEN + MAC_LEN;
/// Length of a response.
pub const RESPONSE_LEN: usize = 1 + 4 + 4 + NOISE_RESP_LEN + MAC_LEN;
/// Length of the cookie-reply nonce (XChaCha20-Poly1305).
pub const COOKIE_NONCE_LEN: usize = 24;
/// Length of a cookie.
pub const COOKIE_LEN: usize = 16;
/// Length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 1 + 4 + COOKIE_NONCE_LEN + COOKIE_LEN + TAG_LEN;
/// Length of a transport header (`t | receiver | counter`).
pub const TRANSPORT_HEADER_LEN: usize = 1 + 4 + 8;
/// Smallest transport message (empty datagram = keepalive).
pub const TRANSPORT_MIN_LEN: usize = TRANSPORT_HEADER_LEN + TAG_LEN;
/// Bytes a transport message adds to the datagram it carries.
pub const TRANSPORT_OVERHEAD: usize = TRANSPORT_MIN_LEN;

/// Errors splitting a noise-wire message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NoiseWireError {
    /// Zero bytes.
    #[error("noise message is empty")]
    Empty,
    /// Right type bits, wrong length.
    #[error("noise {kind} has {len} bytes (expected {expected})")]
    BadLength {
        kind: &'static str,
        len: usize,
        expected: usize,
    },
    /// A transport message shorter than header + tag.
    #[error("noise transport message has {0} bytes (at least {TRANSPORT_MIN_LEN} needed)")]
    ShortTransport(usize),
    /// A transport message whose byte 0 high bits do not match its tag.
    #[error("noise transport message has a bad type byte")]
    BadTypeByte,
}

impl NoiseWireError {
    /// A short, stable label for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            NoiseWireError::Empty => "empty",
            NoiseWireError::BadLength { .. } => "bad_length",
            NoiseWireError::ShortTransport(_) => "short_transport",
            NoiseWireError::BadTypeByte => "bad_type_byte",
        }
    }
}

/// A checked view of a handshake initiation.
#[derive(Debug, Clone, Copy)]
pub struct Initiation<'a> {
    /// The whole message.
    pub bytes: &'a [u8],
    /// The client's index for this handshake.
    pub sender: u32,
    /// Noise IK message 1.
    pub noise: &'a [u8],
    /// mac1 (keyed by the server's public key and the PSK).
    pub mac1: &'a [u8],
    /// mac2 (keyed by a cookie, or random bytes when the client holds none).
    pub mac2: &'a [u8],
}

impl<'a> Initiation<'a> {
    /// The bytes mac1 covers (everything before it).
    pub fn mac1_covered(&self) -> &'a [u8] {
        &self.bytes[..INITIATION_LEN - 2 * MAC_LEN]
    }
    /// The bytes mac2 covers (everything before it, mac1 included).
    pub fn mac2_covered(&self) -> &'a [u8] {
        &self.bytes[..INITIATION_LEN - MAC_LEN]
    }
}

/// A checked view of a handshake response.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// The whole message.
    pub bytes: &'a [u8],
    /// The server's index for the new session.
    pub sender: u32,
    /// The client's index (from its initiation).
    pub receiver: u32,
    /// Noise IK message 2.
    pub noise: &'a [u8],
    /// mac1 (keyed by the client's public key and the PSK).
    pub mac1: &'a [u8],
}

impl<'a> Response<'a> {
    /// The bytes mac1 covers (everything before it).
    pub fn mac1_covered(&self) -> &'a [u8] {
        &self.bytes[..RESPONSE_LEN - MAC_LEN]
    }
}

/// A checked view of a cookie reply.
#[derive(Debug, Clone, Copy)]
pub struct CookieReply<'a> {
    /// The whole message.
    pub bytes: &'a [u8],
    /// The client's index (from the initiation that was answered).
    pub receiver: u32,
    /// XChaCha20-Poly1305 nonce.
    pub nonce: &'a [u8],
    /// Encrypted cookie + tag.
    pub sealed: &'a [u8],
}

impl<'a> CookieReply<'a> {
    /// The clear header (type byte and receiver), authenticated as associated data.
    pub fn header(&self) -> &'a [u8] {
        &self.bytes[..5]
    }
}

/// A checked view of a transport message.
#[derive(Debug, Clone, Copy)]
pub struct Transport<'a> {
    /// The receiver's index.
    pub receiver: u32,
    /// The sender's counter (the AEAD nonce).
    pub counter: u64,
    /// Ciphertext + tag.
    pub sealed: &'a [u8],
}

/// One message of the noise wire.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// See [`Initiation`].
    Initiation(Initiation<'a>),
    /// See [`Response`].
    Response(Response<'a>),
    /// See [`CookieReply`].
    CookieReply(CookieReply<'a>),
    /// See [`Transport`].
    Transport(Transport<'a>),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn exact(kind: &'static str, b: &[u8], expected: usize) -> Result<(), NoiseWireError> {
    if b.len() == expected {
        Ok(())
    } else {
        Err(NoiseWireError::BadLength {
            kind,
            len: b.len(),
            expected,
        })
    }
}

/// Splits one noise-wire message into a checked view.
pub fn parse(b: &[u8]) -> Result<Message<'_>, NoiseWireError> {
    let first = *b.first().ok_or(NoiseWireError::Empty)?;
    match first & TYPE_MASK {
        TYPE_INITIATION => {
            exact("initiation", b, INITIATION_LEN)?;
            let m = INITIATION_LEN - 2 * MAC_LEN;
            Ok(Message::Initiation(Initiation {
                bytes: b,
                sender: u32_at(b, 1),
                noise: &b[5..m],
                mac1: &b[m..m + MAC_LEN],
                mac2: &b[m + MAC_LEN..],
            }))
        }
        TYPE_RESPONSE => {
            exact("response", b, RESPONSE_LEN)?;
            let m = RESPONSE_LEN - MAC_LEN;
            Ok(Message::Response(Response {
                bytes: b,
                sender: u32_at(b, 1),
                receiver: u32_at(b, 5),
                noise: &b[9..m],
                mac1: &b[m..],
            }))
        }
        TYPE_COOKIE_REPLY => {
            exact("cookie reply", b, COOKIE_REPLY_LEN)?;
            Ok(Message::CookieReply(CookieReply {
                bytes: b,
                receiver: u32_at(b, 1),
                nonce: &b[5..5 + COOKIE_NONCE_LEN],
                sealed: &b[5 + COOKIE_NONCE_LEN..],
            }))
        }
        _ => {
            if b.len() < TRANSPORT_MIN_LEN {
                return Err(NoiseWireError::ShortTransport(b.len()));
            }
            if transport_type_byte(b[b.len() - 1]) != first {
                return Err(NoiseWireError::BadTypeByte);
            }
            let mut c = [0u8; 8];
            c.copy_from_slice(&b[5..13]);
            Ok(Message::Transport(Transport {
                receiver: u32_at(b, 1),
                counter: u64::from_le_bytes(c),
                sealed: &b[TRANSPORT_HEADER_LEN..],
            }))
        }
    }
}

/// Byte 0 of a handshake message: six random high bits over the type.
pub fn handshake_type_byte(kind: u8, random: u8) -> u8 {
    (random & !TYPE_MASK) | (kind & TYPE_MASK)
}

/// Byte 0 of a transport message whose last byte (end of the AEAD tag) is `tag_last`.
pub fn transport_type_byte(tag_last: u8) -> u8 {
    (tag_last & !TYPE_MASK) | TYPE_TRANSPORT
}

/// Writes a transport header into `out[..TRANSPORT_HEADER_LEN]` except byte 0, which
/// [`finish_transport`] sets once the tag is known.
pub fn put_transport_header(out: &mut [u8], receiver: u32, counter: u64) {
    out[1..5].copy_from_slice(&receiver.to_le_bytes());
    out[5..13].copy_from_slice(&counter.to_le_bytes());
}

/// Sets byte 0 of a sealed transport message.
pub fn finish_transport(out: &mut [u8]) {
    if let Some(&last) = out.last() {
        out[0] = transport_type_byte(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lengths_are_what_the_docs_say() {
        assert_eq!(NOISE_INIT_LEN, 104);
        assert_eq!(INITIATION_LEN, 141);
        assert_eq!(NOISE_RESP_LEN, 48);
        assert_eq!(RESPONSE_LEN, 73);
        assert_eq!(COOKIE_REPLY_LEN, 61);
        assert_eq!(TRANSPORT_MIN_LEN, 29);
    }

    #[test]
    fn each_type_needs_its_exact_length() {
        for (t, len) in [
            (TYPE_INITIATION, INITIATION_LEN),
            (TYPE_RESPONSE, RESPONSE_LEN),
            (TYPE_COOKIE_REPLY, COOKIE_REPLY_LEN),
        ] {
            for l in [len - 1, len + 1, 1] {
                let mut b = vec![0u8; l];
                b[0] = t;
                assert!(
                    matches!(parse(&b), Err(NoiseWireError::BadLength { .. })),
                    "type {t} len {l}"
                );
            }
            let mut b = vec![0xA5u8; len];
            b[0] = handshake_type_byte(t, 0xFF);
            assert!(parse(&b).is_ok());
        }
        assert_eq!(parse(&[]).unwrap_err(), NoiseWireError::Empty);
        assert_eq!(
            parse(&[0u8; 28]).unwrap_err(),
            NoiseWireError::ShortTransport(28)
        );
    }

    #[test]
    fn transport_fields_and_type_byte() {
        let mut b = vec![0u8; TRANSPORT_MIN_LEN + 3];
        put_transport_header(&mut b, 0x0403_0201, 0x0807_0605_0403_0201);
        *b.last_mut().unwrap() = 0xEC;
        finish_transport(&mut b);
        assert_eq!(b[0], 0xEC);
        match parse(&b).unwrap() {
            Message::Transport(t) => {
                assert_eq!(t.receiver, 0x0403_0201);
                assert_eq!(t.counter, 0x0807_0605_0403_0201);
                assert_eq!(t.sealed.len(), 3 + TAG_LEN);
            }
            other => panic!("{other:?}"),
        }
        b[0] ^= 0x40;
        assert_eq!(parse(&b).unwrap_err(), NoiseWireError::BadTypeByte);
    }

    proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(m) = parse(&b) {
                match m {
                    Message::Initiation(i) => prop_assert_eq!(i.mac2_covered().len() + MAC_LEN, b.len()),
                    Message::Response(r) => prop_assert_eq!(r.mac1_covered().len() + MAC_LEN, b.len()),
                    Message::CookieReply(c) => prop_assert_eq!(c.sealed.len(), COOKIE_LEN + TAG_LEN),
                    Message::Transport(t) => prop_assert_eq!(t.sealed.len() + TRANSPORT_HEADER_LEN, b.len()),
                }
            }
        }
    }
}
