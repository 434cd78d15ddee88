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
//!
//! paqet-dp extension (reverse forwards, `docs/protocol-extensions.md` §3; only sent when the client has
//! `[[reverse]]` entries, so an upstream peer never sees them):
//!
//! | type | name  | body |
//! |------|-------|------|
//! | 0x40 | PREVD | `count u8 (1..=16)` + count × (`proto u8 (1 tcp, 2 udp) | hostLen u8 | host | port u16be`) |
//! | 0x41 | PREVA | `count u8 (≤16)` + count × `status u8` ([`ReverseStatus`]) |
//! | 0x42 | PREVC | `index u8` (the entry of this session's PREVD the connection belongs to) |

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
/// Largest number of reverse forwards in one PREVD / PREVA.
pub const MAX_REVERSE: usize = 16;

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
    /// paqet-dp: reverse forwards declared by the client (control stream, client → server).
    pub const PREVD: u8 = 0x40;
    /// paqet-dp: the server's answer to PREVD, one status per entry (same stream, server → client).
    pub const PREVA: u8 = 0x41;
    /// paqet-dp: a connection on a reverse listener (server-opened stream, server → client).
    pub const PREVC: u8 = 0x42;
}

/// Transport of a reverse forward (`proto` byte of a PREVD entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReverseProto {
    /// 1: TCP; the connection's bytes follow the PREVC header raw, both ways.
    Tcp,
    /// 2: UDP; one datagram per smux frame both ways, one stream per source address.
    Udp,
}

impl ReverseProto {
    fn byte(self) -> u8 {
        match self {
            ReverseProto::Tcp => 1,
            ReverseProto::Udp => 2,
        }
    }
}

/// One declared reverse forward: the address (IP literal) and transport the server should listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseEntry {
    /// tcp or udp.
    pub proto: ReverseProto,
    /// Listen host on the server (an IP literal, IPv6 without brackets).
    pub host: String,
    /// Listen port on the server.
    pub port: u16,
}

/// Status byte of a PREVA entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReverseStatus {
    /// 0: listening.
    Accepted,
    /// 1: the address is not in the server's `server.reverse_allow`.
    NotAllowed,
    /// 2: the server could not listen (address in use, e.g. held by another client's session).
    Unavailable,
    /// 3: the entry is malformed (host is not an IP literal, unknown protocol).
    Invalid,
    /// Any other byte (a newer peer's reason).
    Other(u8),
}

impl ReverseStatus {
    /// Wire byte.
    pub fn byte(self) -> u8 {
        match self {
            ReverseStatus::Accepted => 0,
            ReverseStatus::NotAllowed => 1,
            ReverseStatus::Unavailable => 2,
            ReverseStatus::Invalid => 3,
            ReverseStatus::Other(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => ReverseStatus::Accepted,
            1 => ReverseStatus::NotAllowed,
            2 => ReverseStatus::Unavailable,
            3 => ReverseStatus::Invalid,
            b => ReverseStatus::Other(b),
        }
    }
}

impl std::fmt::Display for ReverseStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReverseStatus::Accepted => f.write_str("accepted"),
            ReverseStatus::NotAllowed => f.write_str("not in the server's server.reverse_allow"),
            ReverseStatus::Unavailable => f.write_str("the server cannot listen on it (in use)"),
            ReverseStatus::Invalid => f.write_str("malformed entry"),
            ReverseStatus::Other(b) => write!(f, "refused (status {b})"),
        }
    }
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
    /// paqet-dp: the client's reverse forwards (PREVD).
    ReverseDeclare(Vec<ReverseEntry>),
    /// paqet-dp: the server's answer, one status per declared entry, in order (PREVA).
    ReverseAnswer(Vec<ReverseStatus>),
    /// paqet-dp: a connection of declared entry `index` (PREVC).
    ReverseConnect {
        /// Position of the entry in this session's PREVD.
        index: u8,
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
    /// A PREVD/PREVA with no entry or more than 16.
    #[error("paqet header: reverse forward count {0} outside 1..=16")]
    ReverseCount(usize),
    /// A PREVD entry with a protocol byte other than 1 (tcp) or 2 (udp).
    #[error("paqet header: reverse forward protocol {0} (expected 1 tcp or 2 udp)")]
    ReverseProto(u8),
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
            Header::ReverseDeclare(_) => types::PREVD,
            Header::ReverseAnswer(_) => types::PREVA,
            Header::ReverseConnect { .. } => types::PREVC,
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
            Header::ReverseDeclare(e) => {
                if e.is_empty() || e.len() > MAX_REVERSE {
                    return Err(HeaderError::ReverseCount(e.len()));
                }
                for r in e {
                    if r.host.is_empty() {
                        return Err(HeaderError::EmptyHost);
                    }
                    if r.host.len() > MAX_HOST {
                        return Err(HeaderError::HostTooLong(r.host.len()));
                    }
                }
                if self.body_len() > MAX_BODY {
                    return Err(HeaderError::BodyTooLong(self.body_len()));
                }
                Ok(())
            }
            Header::ReverseAnswer(a) if a.len() > MAX_REVERSE => {
                Err(HeaderError::ReverseCount(a.len()))
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
            Header::ReverseDeclare(e) => {
                1 + e
                    .iter()
                    .map(|r| 4 + r.host.len().min(MAX_HOST))
                    .sum::<usize>()
            }
            Header::ReverseAnswer(a) => 1 + a.len(),
            Header::ReverseConnect { .. } => 1,
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
            Header::ReverseDeclare(e) => {
                // Truncated to the limits so the output always parses (as for the other types).
                let mut body = vec![0u8];
                for r in e.iter().take(MAX_REVERSE) {
                    let h = &r.host.as_bytes()[..r.host.len().min(MAX_HOST)];
                    if body.len() + 4 + h.len() > MAX_BODY {
                        break;
                    }
                    body.push(r.proto.byte());
                    body.push(h.len() as u8);
                    body.extend_from_slice(h);
                    body.extend_from_slice(&r.port.to_be_bytes());
                    body[0] += 1;
                }
                out.extend_from_slice(&(body.len() as u16).to_be_bytes());
                out.extend_from_slice(&body);
            }
            Header::ReverseAnswer(a) => {
                let a = &a[..a.len().min(MAX_REVERSE)];
                out.extend_from_slice(&((1 + a.len()) as u16).to_be_bytes());
                out.push(a.len() as u8);
                out.extend(a.iter().map(|s| s.byte()));
            }
            Header::ReverseConnect { index } => {
                out.extend_from_slice(&1u16.to_be_bytes());
                out.push(*index);
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
            Some(&k)
                if (types::PPING..=types::PUDP).contains(&k)
                    || (types::PREVD..=types::PREVC).contains(&k) =>
            {
                k
            }
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
            types::PREVD => Header::ReverseDeclare(parse_declare(body)?),
            types::PREVA => {
                let count = *body.first().ok_or_else(|| mismatch(1))? as usize;
                if count > MAX_REVERSE {
                    return Err(HeaderError::ReverseCount(count));
                }
                if body_len != 1 + count {
                    return Err(mismatch(1 + count));
                }
                Header::ReverseAnswer(
                    body[1..]
                        .iter()
                        .map(|&b| ReverseStatus::from_byte(b))
                        .collect(),
                )
            }
            types::PREVC => {
                if body_len != 1 {
                    return Err(mismatch(1));
                }
                Header::ReverseConnect { index: body[0] }
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

/// A PREVD body: `count u8 (1..=16)` then `count` entries `proto u8 | hostLen u8 | host | port u16be`,
/// exactly filling the body.
fn parse_declare(body: &[u8]) -> Result<Vec<ReverseEntry>, HeaderError> {
    let mismatch = |expected: usize| HeaderError::BodyLengthMismatch {
        kind: types::PREVD,
        body_len: body.len(),
        expected,
    };
    let count = *body.first().ok_or_else(|| mismatch(1))? as usize;
    if count == 0 || count > MAX_REVERSE {
        return Err(HeaderError::ReverseCount(count));
    }
    let mut at = 1;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (Some(&p), Some(&hl)) = (body.get(at), body.get(at + 1)) else {
            return Err(mismatch(at + 2));
        };
        let proto = match p {
            1 => ReverseProto::Tcp,
            2 => ReverseProto::Udp,
            p => return Err(HeaderError::ReverseProto(p)),
        };
        let hl = hl as usize;
        if hl == 0 {
            return Err(HeaderError::EmptyHost);
        }
        if hl > MAX_HOST {
            return Err(HeaderError::HostTooLong(hl));
        }
        let end = at + 2 + hl + 2;
        let Some(e) = body.get(at + 2..end) else {
            return Err(mismatch(end));
        };
        let host = std::str::from_utf8(&e[..hl])
            .map_err(|_| HeaderError::NonUtf8Host)?
            .to_owned();
        let port = u16::from_be_bytes([e[hl], e[hl + 1]]);
        out.push(ReverseEntry { proto, host, port });
        at = end;
    }
    if at != body.len() {
        return Err(mismatch(at));
    }
    Ok(out)
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
        golden(
            Header::ReverseDeclare(vec![
                ReverseEntry {
                    proto: ReverseProto::Tcp,
                    host: "0.0.0.0".into(),
                    port: 8022,
                },
                ReverseEntry {
                    proto: ReverseProto::Udp,
                    host: "::1".into(),
                    port: 53,
                },
            ]),
            "50 01 40 00 13 02 01 07 302e302e302e30 1f56 02 03 3a3a31 0035",
        );
        golden(
            Header::ReverseAnswer(vec![ReverseStatus::Accepted, ReverseStatus::NotAllowed]),
            "50 01 41 00 03 02 00 01",
        );
        golden(Header::ReverseConnect { index: 1 }, "50 01 42 00 01 01");
    }

    #[test]
    fn reverse_errors() {
        assert_eq!(
            Header::parse(&unhex("500140 0001 00")),
            Err(HeaderError::ReverseCount(0))
        );
        assert_eq!(
            Header::parse(&unhex("500140 0006 01 03 01 61 0050")),
            Err(HeaderError::ReverseProto(3))
        );
        assert_eq!(
            Header::parse(&unhex("500140 0006 01 01 02 61 0050")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 0x40,
                body_len: 6,
                expected: 7
            })
        );
        assert_eq!(
            Header::parse(&unhex("500140 0007 01 01 01 61 0050 00")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 0x40,
                body_len: 7,
                expected: 6
            })
        );
        assert_eq!(
            Header::parse(&unhex("500141 0002 02 00")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 0x41,
                body_len: 2,
                expected: 3
            })
        );
        assert_eq!(
            Header::parse(&unhex("500142 0000")),
            Err(HeaderError::BodyLengthMismatch {
                kind: 0x42,
                body_len: 0,
                expected: 1
            })
        );
        assert_eq!(
            Header::ReverseDeclare(vec![]).validate(),
            Err(HeaderError::ReverseCount(0))
        );
        // Unknown status bytes survive a round trip.
        let (h, _) = Header::parse(&unhex("500141 0002 01 09")).unwrap().unwrap();
        assert_eq!(h, Header::ReverseAnswer(vec![ReverseStatus::Other(9)]));
        // Types between upstream's and ours stay unknown (0x06/0x07 are a fork's, spec §5).
        assert_eq!(
            Header::parse(&[0x50, 0x01, 0x07]),
            Err(HeaderError::UnknownType(7))
        );
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
        fn reverse_bodies_never_panic(kind in 0x40u8..=0x42, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let mut data = vec![MAGIC, VERSION, kind];
            data.extend_from_slice(&(body.len() as u16).to_be_bytes());
            data.extend_from_slice(&body);
            fuzz_parse(&data);
        }

        #[test]
        fn roundtrip_reverse(entries in proptest::collection::vec(("[0-9a-f.:]{1,45}", proptest::prelude::any::<u16>(), proptest::prelude::any::<bool>()), 1..=16)) {
            let h = Header::ReverseDeclare(entries.into_iter().map(|(host, port, udp)| ReverseEntry {
                proto: if udp { ReverseProto::Udp } else { ReverseProto::Tcp }, host, port,
            }).collect());
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
