//! Types shared by the XDP program (`paqet-ebpf`) and userspace (`paqet-userspace`).
//!
//! Everything here is `#[repr(C)]`/plain data so both sides agree on the layout of map keys and values.
#![no_std]

/// Length of the optional guard prefix carried in front of every kcp-go datagram: `magic[4] | cookie[8]`.
pub const GUARD_PREFIX_LEN: usize = 12;
/// Default guard magic.
pub const GUARD_DEFAULT_MAGIC: [u8; 4] = *b"PQT1";

/// Indices of the per-CPU counters kept by the XDP program.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    Seen = 0,
    Steered = 1,
    Passed = 2,
    Malformed = 3,
    GuardDropped = 4,
}

impl XdpCounter {
    pub const COUNT: u32 = 5;
    pub const ALL: [XdpCounter; 5] = [
        XdpCounter::Seen,
        XdpCounter::Steered,
        XdpCounter::Passed,
        XdpCounter::Malformed,
        XdpCounter::GuardDropped,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::Seen => "seen",
            XdpCounter::Steered => "steered",
            XdpCounter::Passed => "passed",
            XdpCounter::Malformed => "malformed",
            XdpCounter::GuardDropped => "guard_dropped",
        }
    }
}
