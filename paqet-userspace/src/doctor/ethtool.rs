//! Minimal `SIOCETHTOOL` queries (driver info, rings, channels, offloads).
//!
//! The ioctls run on a socket opened by the calling thread, so they see the interfaces of the
//! thread's network namespace (unlike `/sys/class/net`, which shows the namespace sysfs was mounted
//! in). Only "get" commands are used: no privileges are needed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GRINGPARAM: u32 = 0x10;
const ETHTOOL_GTSO: u32 = 0x1e;
const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_GCHANNELS: u32 = 0x3c;
/// `ETH_FLAG_LRO` in the `ETHTOOL_GFLAGS` word.
const ETH_FLAG_LRO: u32 = 1 << 15;

/// Errors of an ethtool query.
#[derive(Debug, thiserror::Error)]
pub enum EthtoolError {
    /// The interface name is empty or longer than 15 bytes.
    #[error("interface name {0:?} must be 1..=15 bytes")]
    BadName(String),
    /// The control socket could not be opened.
    #[error("cannot open an ethtool control socket: {0}")]
    Socket(std::io::Error),
    /// The driver does not implement this query.
    #[error("{what} not supported by the driver of {iface}")]
    Unsupported { iface: String, what: &'static str },
    /// Any other ioctl failure (no such device, ...).
    #[error("ethtool {what} on {iface} failed: {source}")]
    Ioctl {
        iface: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// `struct ifreq` with the `ifr_data` member of the union (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Driver identity of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Driver {
    /// Kernel driver name (`veth`, `mlx5_core`, ...).
    pub name: String,
    /// Bus address (PCI `0000:01:00.0`), empty for virtual devices.
    pub bus_info: String,
}

/// `struct ethtool_ringparam` (descriptor counts).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rings {
    cmd: u32,
    /// Largest RX ring the NIC supports.
    pub rx_max: u32,
    rx_mini_max: u32,
    rx_jumbo_max: u32,
    /// Largest TX ring the NIC supports.
    pub tx_max: u32,
    /// Current RX ring size.
    pub rx: u32,
    rx_mini: u32,
    rx_jumbo: u32,
    /// Current TX ring size.
    pub tx: u32,
}

/// `struct ethtool_channels` (queue counts).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Channels {
    cmd: u32,
    /// Maximum RX-only channels.
    pub max_rx: u32,
    /// Maximum TX-only channels.
    pub max_tx: u32,
    max_other: u32,
    /// Maximum combined channels.
    pub max_combined: u32,
    /// Current RX-only channels.
    pub rx: u32,
    /// Current TX-only channels.
    pub tx: u32,
    other: u32,
    /// Current combined channels.
    pub combined: u32,
}

impl Channels {
    /// Queues that receive packets now (RX-only + combined).
    pub fn rx_queues(&self) -> u32 {
        self.rx + self.combined
    }
    /// Most receiving queues the NIC can have.
    pub fn max_rx_queues(&self) -> u32 {
        self.max_rx.max(self.max_combined)
    }
}

/// Receive/segmentation offloads relevant to paqet-dp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// generic-receive-offload.
    pub gro: bool,
    /// large-receive-offload.
    pub lro: bool,
    /// tcp-segmentation-offload.
    pub tso: bool,
}

/// `struct ethtool_value`.
#[repr(C)]
struct Value {
    cmd: u32,
    data: u32,
}

/// An ethtool control socket bound to one interface name.
pub struct Ethtool {
    fd: OwnedFd,
    iface: String,
    name: [u8; libc::IFNAMSIZ],
}

impl Ethtool {
    /// Opens a control socket in the calling thread's network namespace for `iface`.
    pub fn new(iface: &str) -> Result<Self, EthtoolError> {
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
            return Err(EthtoolError::BadName(iface.to_owned()));
        }
        let mut name = [0u8; libc::IFNAMSIZ];
        name[..iface.len()].copy_from_slice(iface.as_bytes());
        // SAFETY: plain socket(2) call; the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(EthtoolError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            iface: iface.to_owned(),
            name,
        })
    }

    /// Issues `SIOCETHTOOL` with `cmd` pointing at a `#[repr(C)]` struct whose first field is the
    /// command word.
    fn ioctl<T>(&self, cmd: &mut T, what: &'static str) -> Result<(), EthtoolError> {
        let mut req = IfReq {
            name: self.name,
            data: (cmd as *mut T).cast(),
            _pad: [0; 16],
        };
        // SAFETY: `req` is a valid ifreq whose data points at a live, correctly sized ethtool
        // struct for the command stored in its first word.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => EthtoolError::Unsupported {
                    iface: self.iface.clone(),
                    what,
                },
                _ => EthtoolError::Ioctl {
                    iface: self.iface.clone(),
                    what,
                    source: e,
                },
            });
        }
        Ok(())
    }

    /// Driver name and bus address (`ethtool -i`).
    pub fn driver(&self) -> Result<Driver, EthtoolError> {
        let mut d = DrvInfo {
            cmd: ETHTOOL_GDRVINFO,
            driver: [0; 32],
            version: [0; 32],
            fw_version: [0; 32],
            bus_info: [0; 32],
            erom_version: [0; 32],
            reserved2: [0; 12],
            n_priv_flags: 0,
            n_stats: 0,
            testinfo_len: 0,
            eedump_len: 0,
            regdump_len: 0,
        };
        self.ioctl(&mut d, "driver info")?;
        Ok(Driver {
            name: c_str(&d.driver),
            bus_info: c_str(&d.bus_info),
        })
    }

    /// Ring sizes (`ethtool -g`).
    pub fn rings(&self) -> Result<Rings, EthtoolError> {
        let mut r = Rings {
            cmd: ETHTOOL_GRINGPARAM,
            ..Rings::default()
        };
        self.ioctl(&mut r, "ring parameters")?;
        Ok(r)
    }

    /// Channel (queue) counts (`ethtool -l`).
    pub fn channels(&self) -> Result<Channels, EthtoolError> {
        let mut c = Channels {
            cmd: ETHTOOL_GCHANNELS,
            ..Channels::default()
        };
        self.ioctl(&mut c, "channels")?;
        Ok(c)
    }

    fn value(&self, cmd: u32, what: &'static str) -> Result<u32, EthtoolError> {
        let mut v = Value { cmd, data: 0 };
        self.ioctl(&mut v, what)?;
        Ok(v.data)
    }

    /// GRO, LRO and TSO state (`ethtool -k`).
    pub fn offloads(&self) -> Result<Offloads, EthtoolError> {
        Ok(Offloads {
            gro: self.value(ETHTOOL_GGRO, "GRO state")? != 0,
            lro: self.value(ETHTOOL_GFLAGS, "offload flags")? & ETH_FLAG_LRO != 0,
            tso: self.value(ETHTOOL_GTSO, "TSO state")? != 0,
        })
    }
}

/// NUL-terminated byte array → String (lossy).
fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<DrvInfo>(), 196);
        assert_eq!(std::mem::size_of::<Rings>(), 36);
        assert_eq!(std::mem::size_of::<Channels>(), 36);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(Ethtool::new(""), Err(EthtoolError::BadName(_))));
        assert!(matches!(
            Ethtool::new("a-name-much-too-long"),
            Err(EthtoolError::BadName(_))
        ));
    }

    #[test]
    fn loopback_has_a_driver_query_answer() {
        // `lo` exists in every namespace; its driver query either answers or is unsupported,
        // never a wrong-size/invalid-argument failure.
        let e = Ethtool::new("lo").expect("socket");
        match e.driver() {
            Ok(_) | Err(EthtoolError::Unsupported { .. }) => {}
            Err(other) => panic!("unexpected: {other}"),
        }
        let off = e.offloads();
        assert!(
            matches!(off, Ok(_) | Err(EthtoolError::Unsupported { .. })),
            "{off:?}"
        );
    }

    #[test]
    fn missing_interface_is_named_in_the_error() {
        let e = Ethtool::new("pqnosuch0").expect("socket");
        let err = e.driver().unwrap_err().to_string();
        assert!(err.contains("pqnosuch0"), "{err}");
    }
}
