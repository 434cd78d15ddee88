//! kcp-go FEC packet header (kcp-go v5.6.72 `fec.go`), spec §3.4.
//!
//! ```text
//! data:   seqid u32le | 0xF1 u16le | size u16le (= len(kcp) + 2) | kcp bytes
//! parity: seqid u32le | 0xF2 u16le | Reed-Solomon parity of the group's `size|kcp` shards
//! ```
//! `seqid / (d+p)` is the group, `seqid % (d+p)` the shard index (data first, then parity).
use thiserror::Error;

/// Bytes of `seqid | type`.
pub const FEC_HEADER: usize = 6;
/// Bytes of `seqid | type | size` in front of the KCP bytes of a data packet.
pub const FEC_DATA_HEADER: usize = 8;
/// Type value of a data packet.
pub const TYPE_DATA: u16 = 0xF1;
/// Type value of a parity packet.
pub const TYPE_PARITY: u16 = 0xF2;
/// Type value reserved by kcp-go for out-of-band packets (never produced by v5.6.72).
pub const TYPE_OOB: u16 = 0xF3;
/// Largest FEC body accepted: kcp-go reads datagrams into 1500-byte buffers (`mtuLimit`).
pub const MAX_FEC_BODY: usize = 1500;
/// Largest shard (`size|kcp` region or parity payload) that fits in [`MAX_FEC_BODY`].
pub const MAX_SHARD: usize = MAX_FEC_BODY - FEC_HEADER;

/// Errors of the FEC layer (header parsing and coder construction).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FecError {
    #[error("FEC body of {0} bytes is shorter than the 8-byte FEC header")]
    Short(usize),
    #[error("FEC body of {0} bytes exceeds the {MAX_FEC_BODY}-byte limit")]
    TooLong(usize),
    #[error("FEC type {0:#06x} is not data (0xf1) or parity (0xf2)")]
    UnknownType(u16),
    #[error("FEC data size field {size} is invalid for a body of {body_len} bytes (needs 2 <= size <= body_len - 6)")]
    BadSize { size: u16, body_len: usize },
    #[error("invalid FEC shard counts dshard={dshard} pshard={pshard} (need both >= 1 and dshard + pshard <= 256)")]
    BadShards { dshard: usize, pshard: usize },
}

/// Kind of an FEC packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FecKind {
    Data,
    Parity,
}

/// A parsed FEC packet borrowing from the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FecPacket<'a> {
    pub seqid: u32,
    pub kind: FecKind,
    /// Data: the KCP bytes (size field stripped). Parity: the parity bytes.
    pub payload: &'a [u8],
    /// The Reed-Solomon shard carried: data: the `size|kcp` region; parity: the parity bytes.
    pub shard: &'a [u8],
}

/// True when the body carries an FEC header (the u16 at offset 4 is 0xF1, 0xF2 or 0xF3). KCP's
/// `cmd|frg` at that offset can never take these values (cmd is 81..84).
#[inline]
pub fn is_fec(body: &[u8]) -> bool {
    body.len() >= FEC_HEADER
        && matches!(
            u16::from_le_bytes([body[4], body[5]]),
            TYPE_DATA | TYPE_PARITY | TYPE_OOB
        )
}

/// Parses an FEC body. Like kcp-go, any FEC packet must be at least 8 bytes long.
pub fn parse(body: &[u8]) -> Result<FecPacket<'_>, FecError> {
    if body.len() < FEC_DATA_HEADER {
        return Err(FecError::Short(body.len()));
    }
    if body.len() > MAX_FEC_BODY {
        return Err(FecError::TooLong(body.len()));
    }
    let seqid = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    let ty = u16::from_le_bytes([body[4], body[5]]);
    let shard = &body[FEC_HEADER..];
    match ty {
        TYPE_DATA => {
            let size = u16::from_le_bytes([body[6], body[7]]);
            if size < 2 || size as usize > shard.len() {
                return Err(FecError::BadSize {
                    size,
                    body_len: body.len(),
                });
            }
            Ok(FecPacket {
                seqid,
                kind: FecKind::Data,
                payload: &body[FEC_DATA_HEADER..FEC_HEADER + size as usize],
                shard,
            })
        }
        TYPE_PARITY => Ok(FecPacket {
            seqid,
            kind: FecKind::Parity,
            payload: shard,
            shard,
        }),
        other => Err(FecError::UnknownType(other)),
    }
}

/// The KCP bytes of a decrypted datagram body. Without FEC (`fec` false) the body is KCP (kcp-go feeds it
/// to KCP whatever it looks like); with FEC an FEC-framed body yields its data packet's KCP bytes, and
/// `None` for parity and malformed FEC packets (which carry no KCP segment); a body without FEC header
/// is KCP.
pub fn kcp_bytes(body: &[u8], fec: bool) -> Option<&[u8]> {
    if !fec || !is_fec(body) {
        return Some(body);
    }
    match parse(body) {
        Ok(p) if p.kind == FecKind::Data => Some(p.payload),
        _ => None,
    }
}

/// Writes `seqid | type` into `out[..6]`. Panics if `out` is shorter than 6 bytes (caller bug).
#[inline]
pub fn write_header(out: &mut [u8], seqid: u32, kind: FecKind) {
    out[..4].copy_from_slice(&seqid.to_le_bytes());
    let ty = match kind {
        FecKind::Data => TYPE_DATA,
        FecKind::Parity => TYPE_PARITY,
    };
    out[4..6].copy_from_slice(&ty.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kcp_bytes_of_plain_data_and_parity_bodies() {
        let kcp = [7u8; 24];
        assert_eq!(kcp_bytes(&kcp, false), Some(&kcp[..]));
        assert_eq!(kcp_bytes(&kcp, true), Some(&kcp[..]), "not FEC-framed");
        let mut data = vec![1, 0, 0, 0, 0xf1, 0, 26, 0];
        data.extend_from_slice(&kcp);
        assert_eq!(kcp_bytes(&data, true), Some(&kcp[..]));
        assert_eq!(
            kcp_bytes(&data, false),
            Some(&data[..]),
            "FEC off: the body is KCP"
        );
        let parity = [2, 0, 0, 0, 0xf2, 0, 9, 9, 9];
        assert_eq!(kcp_bytes(&parity, true), None);
        assert_eq!(
            kcp_bytes(&[0, 0, 0, 0, 0xf1, 0, 99, 0, 1], true),
            None,
            "bad size"
        );
    }

    #[test]
    fn parse_data_and_parity() {
        let body = [5, 0, 0, 0, 0xf1, 0, 5, 0, 0xaa, 0xbb, 0xcc];
        assert!(is_fec(&body));
        let p = parse(&body).unwrap();
        assert_eq!(p.seqid, 5);
        assert_eq!(p.kind, FecKind::Data);
        assert_eq!(p.payload, &[0xaa, 0xbb, 0xcc]);
        assert_eq!(p.shard, &body[6..]);

        let body = [12, 0, 0, 0, 0xf2, 0, 1, 2, 3];
        let p = parse(&body).unwrap();
        assert_eq!(
            (p.seqid, p.kind, p.payload),
            (12, FecKind::Parity, &[1u8, 2, 3][..])
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse(&[0, 0, 0, 0, 0xf1, 0, 2]), Err(FecError::Short(7)));
        assert_eq!(
            parse(&[0, 0, 0, 0, 0xf1, 0, 9, 0, 1]),
            Err(FecError::BadSize {
                size: 9,
                body_len: 9
            })
        );
        assert_eq!(
            parse(&[0, 0, 0, 0, 0xf1, 0, 1, 0, 1]),
            Err(FecError::BadSize {
                size: 1,
                body_len: 9
            })
        );
        assert_eq!(
            parse(&[0, 0, 0, 0, 0xf3, 0, 0, 0]),
            Err(FecError::UnknownType(0xf3))
        );
        assert_eq!(parse(&[0u8; 1501]), Err(FecError::TooLong(1501)));
        // a KCP PUSH segment is not FEC
        assert!(!is_fec(&[1, 2, 3, 4, 81, 0, 0, 2]));
        assert!(!is_fec(&[1, 2, 3]));
    }

    #[test]
    fn header_roundtrip() {
        let mut b = [0u8; 8];
        write_header(&mut b, 0x0102_0304, FecKind::Parity);
        assert_eq!(&b[..6], &[4, 3, 2, 1, 0xf2, 0]);
    }
}
