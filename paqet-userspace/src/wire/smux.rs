//! smux frame codec (xtaci/smux v1.5.x, protocol versions 1 and 2; spec §3.6).
//!
//! Frame layout: `ver u8 | cmd u8 | length u16le | sid u32le | data[length]` (8-byte header).
//! Commands: 0 SYN, 1 FIN, 2 PSH, 3 NOP, 4 UPD. A UPD frame (version 2 flow control) carries exactly
//! 8 bytes: `consumed u32le | window u32le`.
//!
//! Parsing is checked: a bad version, an unknown command, a UPD whose length is not 8, or a SYN/FIN/NOP
//! that carries data is a typed [`FrameError`]; nothing here panics on untrusted bytes.

use thiserror::Error;

/// Size of the smux frame header.
pub const HEADER_LEN: usize = 8;
/// Size of a UPD frame's payload.
pub const UPD_LEN: usize = 8;
/// Largest payload a frame can carry (the length field is 16 bits).
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// smux frame command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cmd {
    /// Open a stream (no data, no reply).
    Syn = 0,
    /// Close a stream ("EOF").
    Fin = 1,
    /// Stream data.
    Psh = 2,
    /// Keepalive (sid 0, no data).
    Nop = 3,
    /// Window update (version 2 only in practice): `consumed u32le | window u32le`.
    Upd = 4,
}

impl Cmd {
    /// Decodes a command byte.
    pub fn from_u8(b: u8) -> Result<Cmd, FrameError> {
        Ok(match b {
            0 => Cmd::Syn,
            1 => Cmd::Fin,
            2 => Cmd::Psh,
            3 => Cmd::Nop,
            4 => Cmd::Upd,
            other => return Err(FrameError::BadCmd(other)),
        })
    }
}

/// Errors decoding an smux frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Fewer than the bytes required by the header (or by `length`) were given.
    #[error("smux frame truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// The version byte differs from the session's protocol version.
    #[error("smux frame version {got} (expected {expected})")]
    BadVersion { got: u8, expected: u8 },
    /// Unknown command byte.
    #[error("smux frame has unknown cmd {0}")]
    BadCmd(u8),
    /// UPD frame whose length is not 8.
    #[error("smux UPD frame for sid {sid} has length {len} (must be 8)")]
    BadUpdLength { sid: u32, len: u16 },
    /// SYN, FIN or NOP frame that carries data (upstream senders never do this).
    #[error("smux {cmd:?} frame for sid {sid} carries {len} data bytes (must be 0)")]
    UnexpectedData { cmd: Cmd, sid: u32, len: u16 },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version (1 or 2).
    pub version: u8,
    /// Command.
    pub cmd: Cmd,
    /// Length of the data that follows.
    pub length: u16,
    /// Stream id.
    pub sid: u32,
}

impl FrameHeader {
    /// Parses and checks the 8-byte header at the start of `buf` against the expected `version`.
    pub fn parse(buf: &[u8], version: u8) -> Result<FrameHeader, FrameError> {
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Truncated {
                need: HEADER_LEN,
                have: buf.len(),
            });
        }
        if buf[0] != version {
            return Err(FrameError::BadVersion {
                got: buf[0],
                expected: version,
            });
        }
        let cmd = Cmd::from_u8(buf[1])?;
        let length = u16::from_le_bytes([buf[2], buf[3]]);
        let sid = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        match cmd {
            Cmd::Upd if length as usize != UPD_LEN => {
                return Err(FrameError::BadUpdLength { sid, len: length })
            }
            Cmd::Syn | Cmd::Fin | Cmd::Nop if length != 0 => {
                return Err(FrameError::UnexpectedData {
                    cmd,
                    sid,
                    len: length,
                })
            }
            _ => {}
        }
        Ok(FrameHeader {
            version,
            cmd,
            length,
            sid,
        })
    }

    /// Writes the header into an 8-byte array.
    #[inline]
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let l = self.length.to_le_bytes();
        let s = self.sid.to_le_bytes();
        [
            self.version,
            self.cmd as u8,
            l[0],
            l[1],
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }

    /// Appends the header to `out`.
    #[inline]
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }
}

/// UPD payload: total bytes the peer's application has consumed and its receive window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upd {
    /// Total bytes read by the receiving application (wrapping u32).
    pub consumed: u32,
    /// The receiver's window (its MaxStreamBuffer).
    pub window: u32,
}

impl Upd {
    /// Parses the 8-byte UPD payload.
    pub fn parse(buf: &[u8]) -> Result<Upd, FrameError> {
        if buf.len() < UPD_LEN {
            return Err(FrameError::Truncated {
                need: UPD_LEN,
                have: buf.len(),
            });
        }
        Ok(Upd {
            consumed: u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]),
            window: u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]),
        })
    }

    /// Serializes the payload.
    #[inline]
    pub fn to_bytes(&self) -> [u8; UPD_LEN] {
        let c = self.consumed.to_le_bytes();
        let w = self.window.to_le_bytes();
        [c[0], c[1], c[2], c[3], w[0], w[1], w[2], w[3]]
    }
}

/// A whole frame borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The checked header.
    pub header: FrameHeader,
    /// The `header.length` data bytes.
    pub data: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Incrementally parses one frame from the start of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `Ok(Some((frame, consumed)))` gives the frame and its total
    /// size. A header error is reported as soon as the 8 header bytes are present.
    pub fn parse(buf: &'a [u8], version: u8) -> Result<Option<(Frame<'a>, usize)>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = FrameHeader::parse(buf, version)?;
        let total = HEADER_LEN + header.length as usize;
        if buf.len() < total {
            return Ok(None);
        }
        Ok(Some((
            Frame {
                header,
                data: &buf[HEADER_LEN..total],
            },
            total,
        )))
    }

    /// The UPD payload, if this is a UPD frame.
    pub fn upd(&self) -> Option<Upd> {
        if self.header.cmd == Cmd::Upd {
            Upd::parse(self.data).ok()
        } else {
            None
        }
    }
}

/// Appends a whole frame to `out`. `data` must be at most [`MAX_PAYLOAD`] bytes; longer data is an error.
pub fn emit_frame(
    version: u8,
    cmd: Cmd,
    sid: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EmitError> {
    if data.len() > MAX_PAYLOAD {
        return Err(EmitError::TooLong {
            sid,
            len: data.len(),
        });
    }
    FrameHeader {
        version,
        cmd,
        length: data.len() as u16,
        sid,
    }
    .emit(out);
    out.extend_from_slice(data);
    Ok(())
}

/// Appends a UPD frame to `out`.
pub fn emit_upd(version: u8, sid: u32, upd: Upd, out: &mut Vec<u8>) {
    FrameHeader {
        version,
        cmd: Cmd::Upd,
        length: UPD_LEN as u16,
        sid,
    }
    .emit(out);
    out.extend_from_slice(&upd.to_bytes());
}

/// Errors emitting a frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EmitError {
    /// Data longer than a frame can carry.
    #[error("smux frame data for sid {sid} is {len} bytes, more than 65535")]
    TooLong { sid: u32, len: usize },
}

/// Fuzz entry point: parses a sequence of frames (both versions), re-emits each valid one and checks the
/// round trip. Never panics on any input except on a codec bug.
pub fn fuzz_frames(data: &[u8]) {
    for version in [1u8, 2u8] {
        let mut rest = data;
        let mut out = Vec::new();
        while let Ok(Some((frame, used))) = Frame::parse(rest, version) {
            out.clear();
            emit_frame(
                version,
                frame.header.cmd,
                frame.header.sid,
                frame.data,
                &mut out,
            )
            .expect("parsed frame data fits a frame");
            assert_eq!(&out[..], &rest[..used], "smux frame round trip");
            if let Some(u) = frame.upd() {
                assert_eq!(u.to_bytes(), frame.data[..UPD_LEN]);
            }
            rest = &rest[used..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    /// The captures' worked example: SYN, PSH(PTCPF), FIN for sid 3.
    #[test]
    fn capture_worked_example_roundtrip() {
        let bytes = unhex("0200000003000000 0202080003000000 5001030003010018 0201000003000000");
        let mut rest = &bytes[..];
        let mut frames = Vec::new();
        while let Some((f, used)) = Frame::parse(rest, 2).unwrap() {
            frames.push((f.header, f.data.to_vec()));
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0].0,
            FrameHeader {
                version: 2,
                cmd: Cmd::Syn,
                length: 0,
                sid: 3
            }
        );
        assert_eq!(
            frames[1].0,
            FrameHeader {
                version: 2,
                cmd: Cmd::Psh,
                length: 8,
                sid: 3
            }
        );
        assert_eq!(frames[1].1, unhex("5001030003010018"));
        assert_eq!(
            frames[2].0,
            FrameHeader {
                version: 2,
                cmd: Cmd::Fin,
                length: 0,
                sid: 3
            }
        );
        let mut out = Vec::new();
        for (h, d) in &frames {
            emit_frame(h.version, h.cmd, h.sid, d, &mut out).unwrap();
        }
        assert_eq!(out, bytes);
    }

    #[test]
    fn upd_roundtrip() {
        let mut out = Vec::new();
        emit_upd(
            2,
            9,
            Upd {
                consumed: 87,
                window: 2_097_152,
            },
            &mut out,
        );
        assert_eq!(out, unhex("0204080009000000 57000000 00002000"));
        let (f, used) = Frame::parse(&out, 2).unwrap().unwrap();
        assert_eq!(used, 16);
        assert_eq!(
            f.upd(),
            Some(Upd {
                consumed: 87,
                window: 2_097_152
            })
        );
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(
            FrameHeader::parse(&unhex("0100000003000000"), 2),
            Err(FrameError::BadVersion {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(
            FrameHeader::parse(&unhex("0205000003000000"), 2),
            Err(FrameError::BadCmd(5))
        );
        assert_eq!(
            FrameHeader::parse(&unhex("0204040003000000"), 2),
            Err(FrameError::BadUpdLength { sid: 3, len: 4 })
        );
        assert_eq!(
            FrameHeader::parse(&unhex("0200010003000000"), 2),
            Err(FrameError::UnexpectedData {
                cmd: Cmd::Syn,
                sid: 3,
                len: 1
            })
        );
        assert_eq!(
            FrameHeader::parse(&[2, 0], 2),
            Err(FrameError::Truncated { need: 8, have: 2 })
        );
        // Incomplete data → need more.
        assert_eq!(Frame::parse(&unhex("02020800030000005001"), 2), Ok(None));
        let mut out = Vec::new();
        assert_eq!(
            emit_frame(2, Cmd::Psh, 1, &vec![0u8; 65536], &mut out),
            Err(EmitError::TooLong { sid: 1, len: 65536 })
        );
    }

    proptest::proptest! {
        #[test]
        fn fuzz_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            fuzz_frames(&data);
        }
    }
}
