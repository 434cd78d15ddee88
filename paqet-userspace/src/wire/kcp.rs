//! KCP segment codec (spec §3.5; kcp-go v5.6.72 == ikcp wire format).
//!
//! A KCP datagram is one or more concatenated segments, each a 24-byte little-endian header followed by
//! `len` data bytes:
//!
//! ```text
//! conv u32 | cmd u8 | frg u8 | wnd u16 | ts u32 | sn u32 | una u32 | len u32 | data[len]
//! ```
//!
//! [`SegmentHeader::parse`] is a checked decoder over untrusted bytes (never panics), [`SegmentHeader::emit`]
//! writes a header into a caller-provided buffer. Nothing here allocates.
use thiserror::Error;

/// Size of a KCP segment header (`IKCP_OVERHEAD`).
pub const OVERHEAD: usize = 24;

/// `cmd` byte of a data segment.
pub const CMD_PUSH: u8 = 81;
/// `cmd` byte of an acknowledgement.
pub const CMD_ACK: u8 = 82;
/// `cmd` byte of a window probe ("ask").
pub const CMD_WASK: u8 = 83;
/// `cmd` byte of a window size announcement ("tell").
pub const CMD_WINS: u8 = 84;

/// The four KCP segment commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cmd {
    /// Data (81).
    Push = CMD_PUSH,
    /// Acknowledgement of one `sn` (82); `ts` echoes the acknowledged segment's `ts`.
    Ack = CMD_ACK,
    /// Window probe: the peer asks for our window (83).
    Wask = CMD_WASK,
    /// Window announcement (84).
    Wins = CMD_WINS,
}

impl Cmd {
    /// Decodes a `cmd` byte; `None` for anything but 81..=84.
    #[inline]
    pub fn from_u8(b: u8) -> Option<Cmd> {
        match b {
            CMD_PUSH => Some(Cmd::Push),
            CMD_ACK => Some(Cmd::Ack),
            CMD_WASK => Some(Cmd::Wask),
            CMD_WINS => Some(Cmd::Wins),
            _ => None,
        }
    }
}

/// Errors of the KCP segment decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum KcpWireError {
    /// Fewer than 24 bytes left where a segment header should start.
    #[error("KCP segment header truncated: need {OVERHEAD} bytes, have {have}")]
    TruncatedHeader {
        /// Bytes available.
        have: usize,
    },
    /// The `cmd` byte is not one of 81 (PUSH), 82 (ACK), 83 (WASK), 84 (WINS).
    #[error("KCP segment has unknown cmd {cmd} (expected 81..=84)")]
    UnknownCmd {
        /// The offending byte.
        cmd: u8,
    },
    /// The `len` field claims more data than the datagram holds.
    #[error("KCP segment len {len} exceeds the {remaining} bytes remaining after its header")]
    LengthOverrun {
        /// The `len` field.
        len: u32,
        /// Bytes remaining after the header.
        remaining: usize,
    },
}

/// A decoded KCP segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Conversation id.
    pub conv: u32,
    /// Command.
    pub cmd: Cmd,
    /// Fragment countdown (message mode); 0 in stream mode.
    pub frg: u8,
    /// Sender's free receive window, in segments.
    pub wnd: u16,
    /// Timestamp (sender's clock, ms) — echoed back in ACKs.
    pub ts: u32,
    /// Sequence number.
    pub sn: u32,
    /// Sender's next expected sequence number (cumulative ack).
    pub una: u32,
    /// Data length following the header.
    pub len: u32,
}

#[inline]
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl SegmentHeader {
    /// Parses one segment from the front of `buf`: returns the header, its data (`len` bytes) and the bytes
    /// after it. Checks that 24 header bytes are present, that `cmd` is known and that `len` fits.
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<(SegmentHeader, &[u8], &[u8]), KcpWireError> {
        if buf.len() < OVERHEAD {
            return Err(KcpWireError::TruncatedHeader { have: buf.len() });
        }
        let cmd = Cmd::from_u8(buf[4]).ok_or(KcpWireError::UnknownCmd { cmd: buf[4] })?;
        let len = le32(buf, 20);
        let remaining = buf.len() - OVERHEAD;
        if len as usize > remaining {
            return Err(KcpWireError::LengthOverrun { len, remaining });
        }
        let h = SegmentHeader {
            conv: le32(buf, 0),
            cmd,
            frg: buf[5],
            wnd: u16::from_le_bytes([buf[6], buf[7]]),
            ts: le32(buf, 8),
            sn: le32(buf, 12),
            una: le32(buf, 16),
            len,
        };
        let (data, rest) = buf[OVERHEAD..].split_at(len as usize);
        Ok((h, data, rest))
    }

    /// Writes the 24-byte header into `out[..24]` (the data, if any, is the caller's to place after it).
    ///
    /// # Panics
    /// If `out` is shorter than [`OVERHEAD`] — a programming error, output buffers are sized by the caller.
    #[inline]
    pub fn emit(&self, out: &mut [u8]) {
        let o = &mut out[..OVERHEAD];
        o[0..4].copy_from_slice(&self.conv.to_le_bytes());
        o[4] = self.cmd as u8;
        o[5] = self.frg;
        o[6..8].copy_from_slice(&self.wnd.to_le_bytes());
        o[8..12].copy_from_slice(&self.ts.to_le_bytes());
        o[12..16].copy_from_slice(&self.sn.to_le_bytes());
        o[16..20].copy_from_slice(&self.una.to_le_bytes());
        o[20..24].copy_from_slice(&self.len.to_le_bytes());
    }
}

/// The `conv` of the first segment of a datagram, if it is at least one header long.
#[inline]
pub fn peek_conv(buf: &[u8]) -> Option<u32> {
    if buf.len() < OVERHEAD {
        return None;
    }
    Some(le32(buf, 0))
}

/// The `conv` and `sn` of the first segment of a datagram, read from its fixed header without validating
/// `cmd` or `len` (a routing peek: the session's KCP input checks the segment), if it is at least one header
/// long.
#[inline]
pub fn peek_conv_sn(buf: &[u8]) -> Option<(u32, u32)> {
    if buf.len() < OVERHEAD {
        return None;
    }
    Some((le32(buf, 0), le32(buf, 12)))
}

/// An iterator over the segments of one datagram; stops after the first error (which it yields).
pub struct Segments<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Segments<'a> {
    /// Iterates over all segments of `datagram`.
    pub fn new(datagram: &'a [u8]) -> Self {
        Segments {
            rest: datagram,
            failed: false,
        }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = Result<(SegmentHeader, &'a [u8]), KcpWireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match SegmentHeader::parse(self.rest) {
            Ok((h, data, rest)) => {
                self.rest = rest;
                Some(Ok((h, data)))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Fuzz entry point: parses `data` as a sequence of segments; every parsed segment must re-emit to the
/// identical bytes. Panics only if that round-trip invariant is broken.
pub fn fuzz_segments(data: &[u8]) {
    let mut rest = data;
    let mut hdr = [0u8; OVERHEAD];
    while !rest.is_empty() {
        match SegmentHeader::parse(rest) {
            Ok((h, seg_data, next)) => {
                assert_eq!(seg_data.len(), h.len as usize);
                h.emit(&mut hdr);
                assert_eq!(
                    &hdr[..],
                    &rest[..OVERHEAD],
                    "KCP header round-trip mismatch"
                );
                assert_eq!(rest.len(), OVERHEAD + seg_data.len() + next.len());
                rest = next;
            }
            Err(_) => break,
        }
    }
    let _ = peek_conv(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_conv_sn_reads_the_first_header() {
        let h = SegmentHeader {
            conv: 0x0102_0304,
            cmd: Cmd::Push,
            frg: 0,
            wnd: 128,
            ts: 9,
            sn: 77,
            una: 3,
            len: 0,
        };
        let mut b = [0u8; OVERHEAD + 2];
        h.emit(&mut b);
        assert_eq!(peek_conv_sn(&b), Some((0x0102_0304, 77)));
        assert_eq!(peek_conv_sn(&b[..OVERHEAD]), Some((0x0102_0304, 77)));
        assert_eq!(peek_conv_sn(&b[..OVERHEAD - 1]), None);
    }

    /// Body of the first client → server frame of `fast.pcap` (captures README, worked example).
    const FAST_BODY: &str = "63942f55 51 00 0002 52000000 00000000 00000000 20000000 \
        0200000003000000 0202080003000000 5001030003010018 0201000003000000";

    fn body() -> Vec<u8> {
        hex::decode(FAST_BODY.replace(' ', "")).unwrap()
    }

    #[test]
    fn golden_fast_pcap_first_segment() {
        let b = body();
        assert_eq!(peek_conv(&b), Some(0x552f_9463));
        let (h, data, rest) = SegmentHeader::parse(&b).unwrap();
        assert_eq!(
            h,
            SegmentHeader {
                conv: 0x552f_9463,
                cmd: Cmd::Push,
                frg: 0,
                wnd: 512,
                ts: 0x52,
                sn: 0,
                una: 0,
                len: 32
            }
        );
        assert!(rest.is_empty());
        assert_eq!(&data[..8], &hex::decode("0200000003000000").unwrap()[..]);
        let mut out = vec![0u8; OVERHEAD + data.len()];
        h.emit(&mut out);
        out[OVERHEAD..].copy_from_slice(data);
        assert_eq!(out, b);
        fuzz_segments(&b);
    }

    #[test]
    fn golden_other_captures() {
        // null.pcap first body: same segment shape, conv 0x60da1330, ts 0x4b.
        let b = hex::decode(
            "3013da60510000024b0000000000000000000000200000000200000003000000020208000300000050010300030100180201000003000000",
        )
        .unwrap();
        let (h, _, rest) = SegmentHeader::parse(&b).unwrap();
        assert_eq!(
            (h.conv, h.cmd, h.wnd, h.ts, h.len),
            (0x60da_1330, Cmd::Push, 512, 0x4b, 32)
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn rejects_bad_input() {
        let b = body();
        assert_eq!(
            SegmentHeader::parse(&b[..23]),
            Err(KcpWireError::TruncatedHeader { have: 23 })
        );
        let mut bad = b.clone();
        bad[4] = 80;
        assert_eq!(
            SegmentHeader::parse(&bad),
            Err(KcpWireError::UnknownCmd { cmd: 80 })
        );
        assert_eq!(
            SegmentHeader::parse(&b[..50]),
            Err(KcpWireError::LengthOverrun {
                len: 32,
                remaining: 26
            })
        );
        let mut huge = b.clone();
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            SegmentHeader::parse(&huge),
            Err(KcpWireError::LengthOverrun { len: u32::MAX, .. })
        ));
        assert_eq!(peek_conv(&b[..3]), None);
    }

    #[test]
    fn segments_iterator_walks_concatenation() {
        let mut d = body();
        d.extend_from_slice(&body());
        let segs: Vec<_> = Segments::new(&d).collect();
        assert_eq!(segs.len(), 2);
        assert!(segs.iter().all(|s| s.is_ok()));
        d.push(1);
        let segs: Vec<_> = Segments::new(&d).collect();
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[2], Err(KcpWireError::TruncatedHeader { have: 1 }));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            fuzz_segments(&data);
        }
    }
}
