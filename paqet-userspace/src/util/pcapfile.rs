//! A reader for classic libpcap capture files (`a1b2c3d4`/`a1b23c4d` magic, either byte order).
//!
//! Used by the golden-capture tests and by tools; it never panics on malformed files.
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PcapFileError {
    #[error("pcap file shorter than its 24-byte global header")]
    ShortHeader,
    #[error("not a classic pcap file (magic {0:#010x})")]
    BadMagic(u32),
    #[error("record {index}: header or data runs past the end of the file")]
    Truncated { index: usize },
}

/// One captured frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Capture time in microseconds since the epoch (nanosecond files are rounded down).
    pub ts_micros: u64,
    /// Length of the frame on the wire.
    pub orig_len: u32,
    /// The captured bytes (may be shorter than `orig_len` when the capture was truncated).
    pub data: &'a [u8],
}

/// A parsed capture: the link type and its records.
#[derive(Debug, Clone)]
pub struct PcapFile<'a> {
    pub link_type: u32,
    pub snaplen: u32,
    pub records: Vec<Record<'a>>,
}

impl<'a> PcapFile<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Self, PcapFileError> {
        if buf.len() < 24 {
            return Err(PcapFileError::ShortHeader);
        }
        let magic_le = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let (big_endian, nanos) = match magic_le {
            0xa1b2_c3d4 => (false, false),
            0xa1b2_3c4d => (false, true),
            0xd4c3_b2a1 => (true, false),
            0x4d3c_b2a1 => (true, true),
            other => return Err(PcapFileError::BadMagic(other)),
        };
        let rd = |b: &[u8]| -> u32 {
            let a = [b[0], b[1], b[2], b[3]];
            if big_endian {
                u32::from_be_bytes(a)
            } else {
                u32::from_le_bytes(a)
            }
        };
        let snaplen = rd(&buf[16..20]);
        let link_type = rd(&buf[20..24]);
        let mut records = Vec::new();
        let mut off = 24usize;
        while off < buf.len() {
            let index = records.len();
            let hdr = buf
                .get(off..off + 16)
                .ok_or(PcapFileError::Truncated { index })?;
            let sec = rd(&hdr[0..4]) as u64;
            let frac = rd(&hdr[4..8]) as u64;
            let incl = rd(&hdr[8..12]) as usize;
            let orig_len = rd(&hdr[12..16]);
            let start = off + 16;
            let end = start
                .checked_add(incl)
                .ok_or(PcapFileError::Truncated { index })?;
            let data = buf
                .get(start..end)
                .ok_or(PcapFileError::Truncated { index })?;
            let ts_micros = sec * 1_000_000 + if nanos { frac / 1000 } else { frac };
            records.push(Record {
                ts_micros,
                orig_len,
                data,
            });
            off = end;
        }
        Ok(PcapFile {
            link_type,
            snaplen,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(
            PcapFile::parse(&[0u8; 3]).unwrap_err(),
            PcapFileError::ShortHeader
        );
        assert!(matches!(
            PcapFile::parse(&[0u8; 24]),
            Err(PcapFileError::BadMagic(0))
        ));
        let mut f = vec![0xd4, 0xc3, 0xb2, 0xa1];
        f.extend_from_slice(&[0u8; 20]);
        f.extend_from_slice(&[0u8; 8]);
        f.extend_from_slice(&100u32.to_le_bytes());
        f.extend_from_slice(&100u32.to_le_bytes());
        f.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            PcapFile::parse(&f).unwrap_err(),
            PcapFileError::Truncated { index: 0 }
        );
    }

    #[test]
    fn reads_the_upstream_captures() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/testdata/upstream-alpha21"
        );
        for (name, frames) in [("fast", 65), ("fec", 87), ("null", 63)] {
            let bytes = std::fs::read(format!("{dir}/{name}.pcap")).expect("capture present");
            let f = PcapFile::parse(&bytes).unwrap();
            assert_eq!(f.link_type, 1, "{name}: Ethernet");
            assert_eq!(f.records.len(), frames, "{name}: frame count");
            assert!(f.records.iter().all(|r| r.data.len() as u32 == r.orig_len));
        }
    }
}
