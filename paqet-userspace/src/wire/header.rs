//! paqet per-stream header, alpha.21 (spec §3.7).
//!
//! `0x50 ('P') | 0x01 (version) | type u8 | bodyLen u16be | body[bodyLen]`, bodyLen ≤ 4096.
//!
//! | type | name  | body |
//! |------|-------|------|
//! | 1    | PPING | empty |
//! | 2    | PPONG | empty |
//! | 3    | PTCPF | `count u8 (≤64)` + count × u16be flag bitmask |
//! | 4    | PTCP  | `hostLen u8 (≤253) | host | port u16be` |
//! | 5    | PUDP  | same as PTCP |

use thiserror::Error;

/// Magic byte `'P'`.
pub const MAGIC: u8 = 0x50;
/// Header version (alpha.21).
pub const VERSION: u8 = 0x01;
/// Fixed prefix size: magic, version, type, bodyLen.
pub const PREFIX_LEN: usize = 5;
/// Largest body accepted.
pub const MAX_BODY: usize = 4096;
/// Largest host string.
pub const MAX_HOST: usize = 253;
/// Largest PTCPF flag count.
pub const MAX_FLAGS: usize = 64;

/// Message type bytes.
pub mod types {
    /// Ping.
    pub const PPING: u8 = 0x01;
    /// Pong.
    pub const PPONG: u8 = 0x02;
    /// TCP flag list.
    pub const PTCPF: u8 = 0x03;
    /// TCP connect.
    pub const PTCP: u8 = 0x04;
    /// UDP association.
    pub const PUDP: u8 = 0x05;
}

/// A decoded per-stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// Liveness ping; the server replies with [`Header::Pong`].
    Ping,
    /// Reply to a ping.
    Pong,
    /// TCP flag combinations the server should cycle for this client (FIN 0x001 … NS 0x100).
    TcpFlags(Vec<u16>),
    /// Open a TCP connection to `host:port`.
    Tcp {
        /// Domain, dotted IPv4, or IPv6 without brackets.
        host: String,
        /// Destination port.
        port: u16,
    },
    /// Forward UDP datagrams to `host:port`.
    Udp {
        /// Domain, dotted IPv4, or IPv6 without brackets.
        host: String,
        /// Destination port.
        port: u16,
    },
}

/// Errors decoding or encoding a header.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// First byte is not 0x50.
    #[error("paqet header: bad magic byte {0:#04x} (expected 0x50)")]
    BadMagic(u8),
    /// Second byte is not 0x01.
    #[error("paqet header: unsupported version {0:#04x} (expected 0x01)")]
    BadVersion(u8),
    /// Unknown message type.
    #[error("paqet header: unknown message type {0:#04x}")]
    UnknownType(u8),
    /// bodyLen above 4096.
    #[error("paqet header: body length {0} exceeds 4096")]
    BodyTooLong(usize),
    /// Host string longer than 253 bytes.
    #[error("paqet header: host length {0} exceeds 253")]
    HostTooLong(usize),
    /// Empty host string on encode.
    #[error("paqet header: empty host")]
    EmptyHost,
    /// More than 64 flag entries.
    #[error("paqet header: PTCPF count {0} exceeds 64")]
    TooManyFlags(usize),
    /// The body length does not match what the body's own fields say.
    #[error("paqet header: type {kind:#04x} body length {body_len} does not match its content (expected {expected})")]
    BodyLengthMismatch {
        /// Message type.
        kind: u8,
        /// bodyLen as sent.
        body_len: usize,
        /// Length implied by the body's fields.
        expected: usize,
    },
    /// Host bytes are not UTF-8.
    #[error("paqet header: host is not valid UTF-8")]
    NonUtf8Host,
}

impl Header {
    /// The message type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Header::Ping => types::PPING,
            Header::Pong => types::PPONG,
            Header::TcpFlags(_) => types::PTCPF,
            Header::Tcp { .. } => types::PTCP,
            Header::Udp { .. } => types::PUDP,
        }
    }

    /// Checks that the header can be encoded (host ≤ 253 bytes and non-empty, ≤ 64 flags).
    pub fn validate(&self) -> Result<(), HeaderError> {
        match self {
            Header::TcpFlags(f) if f.len() > MAX_FLAGS => Err(HeaderError::TooManyFlags(f.len())),
            Header::Tcp { host, .. } | Header::Udp { host, .. } => {
                if host.is_empty() {
                    Err(HeaderError::EmptyHost)
                } else if host.len() > MAX_HOST {
                    Err(HeaderError::HostTooLong(host.len()))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Length of the encoded header.
    pub fn encoded_len(&self) -> usize {
        PREFIX_LEN + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            Header::Ping | Header::Pong => 0,
            Header::TcpFlags(f) => 1 + 2 * f.len(),
            Header::Tcp { host, .. } | Header::Udp { host, .. } => 1 + host.len() + 2,
        }
    }

    /// Checked encode: appends the header to `out` after [`Header::validate`].
    pub fn try_emit(&self, out: &mut Vec<u8>) -> Result<(), HeaderError> {
        self.validate()?;
        self.emit(out);
        Ok(())
    }

    /// Appends the encoded header to `out`. Inputs outside the limits (see [`Header::validate`]) are
    /// truncated to them (host to 253 bytes, flags to 64 entries) so the output always parses; use
    /// [`Header::try_emit`] to reject them instead.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        match self {
            Header::Ping | Header::Pong => out.extend_from_slice(&0u16.to_be_bytes()),
            Header::TcpFlags(f) => {
                let f = &f[..f.len().min(MAX_FLAGS)];
                out.extend_from_slice(&((1 + 2 * f.len()) as u16).to_be_bytes());
                out.push(f.len() as u8);
                for v in f {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Header::Tcp { host, port } | Header::Udp { host, port } => {
                let mut h = host.as_bytes();
                if h.len() > MAX_HOST {
                    h = &h[..MAX_HOST];
                }
                out.extend_from_slice(&((1 + h.len() + 2) as u16).to_be_bytes());
                out.push(h.len() as u8);
                out.extend_from_slice(h);
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
    }

    /// Incrementally parses a header from the start of `buf`.
    ///
    /// `Ok(None)`: more bytes are needed. `Ok(Some((header, consumed)))`: the header and how many bytes it
    /// took (the stream payload starts right after). Errors are reported as soon as the offending byte is
    /// present.
    pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
        if let Some(&m) = buf.first() {
            if m != MAGIC {
                return Err(HeaderError::BadMagic(m));
            }
        }
        if let Some(&v) = buf.get(1) {
            if v != VERSION {
                return Err(HeaderError::BadVersion(v));
            }
        }
        let kind = match buf.get(2) {
            Some(&k) if (types::PPING..=types::PUDP).contains(&k) => k,
            Some(&k) => return Err(HeaderError::UnknownType(k)),
            None => return Ok(None),
        };
        if buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let body_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        if body_len > MAX_BODY {
            return Err(HeaderError::BodyTooLong(body_len));
        }
        let total = PREFIX_LEN + body_len;
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[PREFIX_LEN..total];
        let mismatch = |expected: usize| HeaderError::BodyLengthMismatch {
            kind,
            body_len,
            expected,
        };
        let header = match kind {
            types::PPING | types::PPONG => {
                if body_len != 0 {
                    return Err(mismatch(0));
                }
                if kind == types::PPING {
                    Header::Ping
                } else {
                    Header::Pong
                }
            }
            types::PTCPF => {
                let count = *body.first().ok_or_else(|| mismatch(1))? as usize;
                if count > MAX_FLAGS {
                    return Err(HeaderError::TooManyFlags(count));
                }
                if body_len != 1 + 2 * count {
                    return Err(mismatch(1 + 2 * count));
                }
                Header::TcpFlags(
                    body[1..]
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect(),
                )
            }
            _ => {
                let host_len = *body.first().ok_or_else(|| mismatch(3))? as usize;
                if host_len > MAX_HOST {
                    return Err(HeaderError::HostTooLong(host_len));
                }
                if host_len == 0 {
                    // Nothing to dial (and `try_emit` refuses it): an error, not a header.
                    return Err(HeaderError::EmptyHost);
                }
                if body_len != 1 + host_len + 2 {
                    return Err(mismatch(1 + host_len + 2));
                }
                let host = std::str::from_utf8(&body[1..1 + host_len])
                    .map_err(|_| HeaderError::NonUtf8Host)?
                    .to_owned();
                let port = u16::from_be_bytes([body[1 + host_len], body[2 + host_len]]);
                if kind == types::PTCP {
                    Header::Tcp { host, port }
                } else {
                    Header::Udp { host, port }
                }
            }
        };
        Ok(Some((header, total)))
    }
}

/// Fuzz entry point: parse arbitrary bytes; a successful parse must re-emit to the same bytes, and every
/// prefix of a valid header must report "need more".
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(Some((h, used))) = Header::parse(data) {
        let mut out = Vec::new();
        h.try_emit(&mut out).expect("parsed header re-encodes");
        assert_eq!(&out[..], &data[..used], "paqet header round trip");
        for cut in 0..used {
            assert_eq!(
                Header::parse(&data[..cut]),
                Ok(None),
                "prefix of a valid header"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    /// Found by `cargo fuzz run header`: PUDP with an empty host parsed, then failed to re-encode.
    #[test]
    fn empty_host_is_an_error_not_a_header() {
        let crash = unhex("5001050003000100508f01ff41");
        assert_eq!(Header::parse(&crash), Err(HeaderError::EmptyHost));
        assert_eq!(
            Header::parse(&unhex("5001040003000050")),
            Err(HeaderError::EmptyHost)
        );
        fuzz_parse(&crash);
    }

    fn golden(h: Header, bytes: &str) {
        let bytes = unhex(bytes);
        let mut out = Vec::new();
        h.try_emit(&mut out).unwrap();
        assert_eq!(out, bytes, "emit {h:?}");
        assert_eq!(h.encoded_len(), bytes.len());
        let mut with_payload = bytes.clone();
        with_payload.extend_from_slice(b"GET /");
        assert_eq!(
            Header::parse(&with_payload),
            Ok(Some((h.clone(), bytes.len())))
        );
        for cut in 0..bytes.len() {
            assert_eq!(Header::parse(&bytes[..cut]), Ok(None), "cut {cut} of {h:?}");
        }
    }

    #[test]
    fn golden_vectors() {
        golden(Header::TcpFlags(vec![0x18]), "50 01 03 00 03 01 00 18");
        golden(
            Header::Tcp {
                host: "example.com".into(),
                port: 443,
            },
            "50 01 04 00 0E 0B 65 78 61 6D 70 6C 65 2E 63 6F 6D 01 BB",
        );
        golden(
            Header::Tcp {
                host: "127.0.0.1".into(),
                port: 8000,
            },
            "50 01 04 00 0c 09 31 32 37 2e 30 2e 30 2e 31 1f 40",
        );
        golden(
            Header::Udp {
                host: "127.0.0.1".into(),
                port: 5300,
            },
            "50 01 05 00 0c 09 31 32 37 2e 30 2e 30 2e 31 14 b4",
        );
        golden(Header::Pong, "50 01 02 00 00");
        golden(Header::Ping, "50 01 01 00 00");
        golden(Header::TcpFlags(vec![]), "50 01 03 00 01 00");
    }

    #[test]
    fn errors() {
        assert_eq!(Header::parse(&[0x51]), Err(HeaderError::BadMagic(0x51)));
        assert_eq!(
            Header::parse(&[0x50, 0x02]),
            Err(HeaderError::BadVersion(2))
        );
        assert_eq!(
            Header::parse(&[0x50, 0x01, 0x06]),
            Err(HeaderError::UnknownType(6))
        );
        assert_eq!(
            Header::parse(&[0x50, 0x01, 0x00]),
            Err(HeaderError::UnknownType(0))
        );
        assert_eq!(Header::parse(&unhex("5001041000")), Ok(None)); // 4096 is allowed: need more
        assert_eq!(
            Header::parse(&unhex("5001041001")),
            Err(HeaderError::BodyTooLong(4097))
        );
        let mut long = unhex("500104 0100 fe");
        long.resize(5 + 256, b'a');
        assert_eq!(Header::parse(&long), Err(HeaderError::HostTooLong(254)));
        let mut many = unhex("500103 0083 41");
        many.resize(5 + 0x83, 0);
        assert_eq!(Header::parse(&many), Err(HeaderError::TooManyFlags(65)));
        assert_eq!(
            Header::parse(&unhex("500103 0004 01 0018 00")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 3,
                body_len: 4,
                expected: 3
            })
        );
        assert_eq!(
            Header::parse(&unhex("500104 0005 01 61 0050 00")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 4,
                body_len: 5,
                expected: 4
            })
        );
        assert_eq!(
            Header::parse(&unhex("500103 0000")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 3,
                body_len: 0,
                expected: 1
            })
        );
        assert_eq!(
            Header::parse(&unhex("500104 0004 01 ff 0050")),
            Err(HeaderError::NonUtf8Host)
        );
        assert_eq!(
            Header::parse(&unhex("500101 0001 00")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 1,
                body_len: 1,
                expected: 0
            })
        );
        let h = Header::Tcp {
            host: "a".repeat(254),
            port: 1,
        };
        assert_eq!(
            h.try_emit(&mut Vec::new()),
            Err(HeaderError::HostTooLong(254))
        );
        assert_eq!(
            Header::TcpFlags(vec![0; 65]).validate(),
            Err(HeaderError::TooManyFlags(65))
        );
        assert_eq!(
            Header::Udp {
                host: String::new(),
                port: 1
            }
            .validate(),
            Err(HeaderError::EmptyHost)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            fuzz_parse(&data);
        }

        #[test]
        fn roundtrip_tcp(host in "[a-z0-9.:-]{1,253}", port in proptest::prelude::any::<u16>(), udp in proptest::prelude::any::<bool>()) {
            let h = if udp { Header::Udp { host, port } } else { Header::Tcp { host, port } };
            let mut out = Vec::new();
            h.try_emit(&mut out).unwrap();
            proptest::prop_assert_eq!(Header::parse(&out), Ok(Some((h, out.len()))));
            fuzz_parse(&out);
        }

        #[test]
        fn roundtrip_flags(flags in proptest::collection::vec(0u16..0x200, 0..=64)) {
            let h = Header::TcpFlags(flags);
            let mut out = Vec::new();
            h.try_emit(&mut out).unwrap();
            proptest::prop_assert_eq!(Header::parse(&out), Ok(Some((h, out.len()))));
        }
    }
}
