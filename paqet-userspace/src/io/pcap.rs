//! libpcap backend: capture with libpcap (as upstream paqet does), inject with an AF_PACKET raw
//! socket (default) or a second pcap handle (`pcap_sendpacket`, upstream's way).
//!
//! Capture setup follows spec §3.2: BPF `tcp and dst port <port>` (optionally `and dst host <ip>`),
//! non-promiscuous, immediate mode, buffer = `network.pcap.sockbuf`, direction IN, non-blocking;
//! timeouts are implemented by polling the selectable fd.
//!
//! Snap length: upstream asks for 65536. In immediate mode libpcap uses a TPACKET_V2 ring of fixed-size
//! slots, sized from the snap length, and when the interface has any segmentation/receive offload on
//! (GSO is on for veth and most NICs) it keeps slots of ~64 KiB: a 4 MiB `sockbuf` then holds only 64
//! frames, and a burst of a 2048-packet KCP window overflows it at once (measured: 286,488 `ps_drop` in
//! 9 s of a fast3 transfer, 10.7 MB/s). Tunnel frames never exceed the interface MTU (paqet's fake TCP
//! advances `seq` by 128 per packet, so GRO never merges them), so by default the snap length is the
//! MTU plus the Ethernet header and two VLAN tags: two slots per page, 2048 frames per 4 MiB. Longer
//! frames are counted as truncated (they cannot be valid tunnel datagrams).
//!
//! Injection: an AF_PACKET `SOCK_RAW` socket bound to the interface with protocol 0 (it never
//! receives anything). Frames can be batched and pushed with one `sendmmsg(2)` (see
//! [`PcapConfig::tx_batch`]). Measured on veth with 1400-byte frames (2 vCPU, 3 rounds x 2 runs,
//! `tests/pcap_io.rs::tx_methods_compare`): `pcap_sendpacket` 675-959 kpps, AF_PACKET `send`
//! 628-796 kpps, AF_PACKET `sendmmsg` x32 728-937 kpps, AF_PACKET `send` + `PACKET_QDISC_BYPASS`
//! 826-1108 kpps. Plain pcap and AF_PACKET are the same syscall underneath (within noise); AF_PACKET
//! is the default because it adds batching and the qdisc bypass, the one clear win.
//!
//! Medium: the capture's datalink type decides what frames start with ([`PcapIo::medium`]). EN10MB is
//! Ethernet; RAW / IPV4 / IPV6 (tun, WireGuard) are bare IP packets; LINUX_SLL / LINUX_SLL2 (libpcap's
//! cooked mode, chosen for ppp) carry a pseudo-header that is stripped here, so the worker sees bare IP
//! packets too. Any other datalink is refused at open with [`PcapIoError::UnsupportedDatalink`]. On an IP
//! medium the AF_PACKET injector sends each packet with `sll_protocol` = IPv4/IPv6 from its version
//! nibble (ppp and WireGuard look at the skb protocol; with protocol 0 they would drop it).

use std::ffi::{c_int, c_uint, c_void, CString};
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use pcap::{Active, Capture};
use thiserror::Error;

use super::{poll_readable, IoStats, Medium, PacketIo};

/// Upper bound on frames per `sendmmsg` batch.
pub const MAX_TX_BATCH: usize = 64;

/// How frames are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMethod {
    /// AF_PACKET `SOCK_RAW` socket bound to the interface (default; supports `sendmmsg` batching).
    AfPacket,
    /// A second libpcap handle and `pcap_sendpacket` (upstream's method; no batching).
    Pcap,
}

/// Settings of the pcap backend.
#[derive(Debug, Clone)]
pub struct PcapConfig {
    /// Interface name, e.g. `eth0`.
    pub iface: String,
    /// Local TCP port: only frames with this destination port are captured.
    pub port: u16,
    /// If set, also require this destination address (`and dst host <ip>`).
    pub dst_host: Option<IpAddr>,
    /// Kernel capture buffer in bytes (`network.pcap.sockbuf`).
    pub sockbuf: usize,
    /// Capture length per frame; 0 = the interface MTU + 22 (see the module notes; upstream asks 65536).
    pub snaplen: u32,
    /// Frames delivered per `recv_batch` at most.
    pub rx_batch: usize,
    /// Injection method.
    pub tx: TxMethod,
    /// Frames kept before an automatic `sendmmsg` (1 = send immediately; capped at
    /// [`MAX_TX_BATCH`]). With > 1, callers must call [`PacketIo::flush`] after a burst.
    pub tx_batch: usize,
    /// Set `PACKET_QDISC_BYPASS` on the AF_PACKET socket (skips the qdisc and local taps such as
    /// tcpdump; the driver may drop with ENOBUFS when its ring is full).
    pub qdisc_bypass: bool,
}

impl PcapConfig {
    /// Upstream defaults for `iface`/`port`: 4 MiB buffer, AF_PACKET TX, no batching; snap length from
    /// the interface MTU.
    pub fn new(iface: impl Into<String>, port: u16) -> Self {
        Self {
            iface: iface.into(),
            port,
            dst_host: None,
            sockbuf: 4 * 1024 * 1024,
            snaplen: 0,
            rx_batch: 64,
            tx: TxMethod::AfPacket,
            tx_batch: 1,
            qdisc_bypass: false,
        }
    }

    /// The BPF filter expression this configuration installs.
    pub fn filter_expr(&self) -> String {
        match self.dst_host {
            Some(ip) => format!("tcp and dst port {} and dst host {}", self.port, ip),
            None => format!("tcp and dst port {}", self.port),
        }
    }
}

/// Errors opening the pcap backend. Every variant names the interface.
#[derive(Debug, Error)]
pub enum PcapIoError {
    /// No interface of that name in the current network namespace.
    #[error("interface \"{iface}\" not found")]
    InterfaceNotFound { iface: String },
    /// The kernel refused a raw socket / capture.
    #[error("permission denied opening {what} on interface \"{iface}\": run as root or grant CAP_NET_RAW (and CAP_NET_ADMIN)")]
    PermissionDenied { iface: String, what: &'static str },
    /// libpcap reported an error.
    #[error("pcap {op} on interface \"{iface}\" failed: {msg}")]
    Pcap {
        iface: String,
        op: &'static str,
        msg: String,
    },
    /// A system call failed.
    #[error("{op} on interface \"{iface}\" failed: {source}")]
    Os {
        iface: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot work.
    #[error("invalid pcap configuration for interface \"{iface}\": {msg}")]
    Config { iface: String, msg: String },
    /// The capture's datalink type is neither Ethernet nor bare IP.
    #[error("interface \"{iface}\" has pcap datalink {name} ({dlt}): paqet runs on EN10MB (Ethernet) or on RAW / IPV4 / IPV6 / LINUX_SLL (no link header: tun, WireGuard, ppp)")]
    UnsupportedDatalink {
        iface: String,
        dlt: i32,
        name: String,
    },
}

/// How captured frames map to the worker's [`Medium`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datalink {
    /// DLT_EN10MB: Ethernet frames, handed over as they are.
    Ethernet,
    /// DLT_RAW / DLT_IPV4 / DLT_IPV6: bare IP packets, handed over as they are.
    Raw,
    /// DLT_LINUX_SLL (16 bytes) / DLT_LINUX_SLL2 (20 bytes): a cooked pseudo-header in front of the IP
    /// packet, stripped before the frame is handed over.
    Cooked { header: usize },
}

/// DLT_EN10MB.
pub const DLT_EN10MB: i32 = 1;
/// DLT_RAW as Linux libpcap reports it (12; 14 on OpenBSD, 101 as LINKTYPE_RAW).
pub const DLT_RAW: i32 = 12;
/// DLT_LINUX_SLL (libpcap's cooked mode).
pub const DLT_LINUX_SLL: i32 = 113;
/// DLT_IPV4.
pub const DLT_IPV4: i32 = 228;
/// DLT_IPV6.
pub const DLT_IPV6: i32 = 229;
/// DLT_LINUX_SLL2.
pub const DLT_LINUX_SLL2: i32 = 276;

impl Datalink {
    /// The framing of pcap datalink `dlt`, or `None` when paqet cannot run on it.
    pub const fn from_dlt(dlt: i32) -> Option<Datalink> {
        match dlt {
            DLT_EN10MB => Some(Datalink::Ethernet),
            DLT_RAW | 14 | 101 | DLT_IPV4 | DLT_IPV6 => Some(Datalink::Raw),
            DLT_LINUX_SLL => Some(Datalink::Cooked { header: 16 }),
            DLT_LINUX_SLL2 => Some(Datalink::Cooked { header: 20 }),
            _ => None,
        }
    }

    /// The medium of the frames handed to the worker.
    pub const fn medium(self) -> Medium {
        match self {
            Datalink::Ethernet => Medium::Ethernet,
            Datalink::Raw | Datalink::Cooked { .. } => Medium::Ip,
        }
    }

    /// Bytes stripped from the front of every captured frame.
    #[inline]
    pub const fn strip(self) -> usize {
        match self {
            Datalink::Cooked { header } => header,
            _ => 0,
        }
    }
}

/// The [`Datalink`] of an activated capture on `iface`, or [`PcapIoError::UnsupportedDatalink`].
pub fn datalink_of<T: pcap::Activated + ?Sized>(
    iface: &str,
    cap: &Capture<T>,
) -> Result<Datalink, PcapIoError> {
    let lt = cap.get_datalink();
    Datalink::from_dlt(lt.0).ok_or_else(|| PcapIoError::UnsupportedDatalink {
        iface: iface.to_owned(),
        dlt: lt.0,
        name: lt.get_name().unwrap_or_else(|_| "unknown".into()),
    })
}

#[repr(C)]
struct RawPcapStat {
    ps_recv: c_uint,
    ps_drop: c_uint,
    ps_ifdrop: c_uint,
}

extern "C" {
    // libpcap is linked by the `pcap` crate; its `raw` module is private, so declare the one call.
    fn pcap_stats(p: *mut c_void, ps: *mut RawPcapStat) -> c_int;
}

/// Returns the ifindex of `iface`, or [`PcapIoError::InterfaceNotFound`].
fn if_index(iface: &str) -> Result<u32, PcapIoError> {
    let c = CString::new(iface).map_err(|_| PcapIoError::InterfaceNotFound {
        iface: iface.to_owned(),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(PcapIoError::InterfaceNotFound {
            iface: iface.to_owned(),
        });
    }
    Ok(idx)
}

/// Ethernet header plus two 802.1Q tags: what a frame may add to the interface MTU.
const L2_OVERHEAD: u32 = 14 + 8;

/// The snap length for `iface`: its MTU (from rtnetlink, so in the calling thread's network namespace)
/// plus [`L2_OVERHEAD`], or 65536 when the MTU can't be read.
fn auto_snaplen(iface: &str) -> u32 {
    super::route::link_info(iface)
        .ok()
        .map(|l| l.mtu)
        .filter(|&m| m >= 68)
        .map_or(65536, |m| (m + L2_OVERHEAD).min(65536))
}

fn pcap_err(iface: &str, op: &'static str, what: &'static str, e: pcap::Error) -> PcapIoError {
    let msg = e.to_string();
    let lower = msg.to_ascii_lowercase();
    if lower.contains("permission") || lower.contains("not permitted") {
        PcapIoError::PermissionDenied {
            iface: iface.to_owned(),
            what,
        }
    } else if lower.contains("no such device") {
        PcapIoError::InterfaceNotFound {
            iface: iface.to_owned(),
        }
    } else {
        PcapIoError::Pcap {
            iface: iface.to_owned(),
            op,
            msg,
        }
    }
}

fn os_err(iface: &str, op: &'static str, what: &'static str, e: std::io::Error) -> PcapIoError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => PcapIoError::PermissionDenied {
            iface: iface.to_owned(),
            what,
        },
        Some(libc::ENODEV) => PcapIoError::InterfaceNotFound {
            iface: iface.to_owned(),
        },
        _ => PcapIoError::Os {
            iface: iface.to_owned(),
            op,
            source: e,
        },
    }
}

/// An AF_PACKET `SOCK_RAW` socket bound to one interface, TX only.
pub struct RawTx {
    fd: OwnedFd,
    ifindex: u32,
    /// [`Medium::Ip`]: frames are bare IP packets, sent with an explicit `sll_protocol`.
    medium: Medium,
}

/// The EtherType of a bare IP packet from its version nibble (network order for `sll_protocol`).
#[inline]
fn ip_protocol_be(packet: &[u8]) -> u16 {
    match packet.first().map(|b| b >> 4) {
        Some(6) => 0x86DDu16.to_be(),
        _ => 0x0800u16.to_be(),
    }
}

impl RawTx {
    /// Opens the socket on `iface` (protocol 0: it receives nothing).
    pub fn open(iface: &str, qdisc_bypass: bool) -> Result<Self, PcapIoError> {
        let ifindex = if_index(iface)?;
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(os_err(
                iface,
                "socket(AF_PACKET)",
                "an AF_PACKET raw socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fresh descriptor, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = 0;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: valid fd and a properly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(os_err(
                iface,
                "bind(AF_PACKET)",
                "an AF_PACKET raw socket",
                std::io::Error::last_os_error(),
            ));
        }
        if qdisc_bypass {
            let one: c_int = 1;
            // SAFETY: valid fd, option value is a c_int.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    &one as *const c_int as *const c_void,
                    std::mem::size_of::<c_int>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(os_err(
                    iface,
                    "setsockopt(PACKET_QDISC_BYPASS)",
                    "an AF_PACKET raw socket",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(Self {
            fd,
            ifindex,
            medium: Medium::Ethernet,
        })
    }

    /// The same socket sending frames of `medium` (on [`Medium::Ip`]: bare IP packets, each sent with
    /// `sll_protocol` IPv4 or IPv6 so that ppp and WireGuard accept it).
    pub fn with_medium(mut self, medium: Medium) -> Self {
        self.medium = medium;
        self
    }

    /// The interface index the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The destination of a bare IP packet: this interface, protocol from the version nibble.
    fn l3_addr(&self, packet: &[u8]) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ip_protocol_be(packet);
        sll.sll_ifindex = self.ifindex as i32;
        sll
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let sll = (self.medium == Medium::Ip).then(|| self.l3_addr(frame));
        let (addr, addr_len) = match &sll {
            Some(a) => (
                a as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ),
            None => (std::ptr::null(), 0),
        };
        loop {
            // SAFETY: valid fd; pointer/len describe `frame`; `addr` is null (len 0) or points at `sll`,
            // which outlives the call.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const c_void,
                    frame.len(),
                    0,
                    addr,
                    addr_len,
                )
            };
            if r >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends up to [`MAX_TX_BATCH`] frames with `sendmmsg`. Returns how many the kernel accepted
    /// before the first failure; the error of that failure, if nothing at all was sent.
    pub fn send_many(&self, frames: &[&[u8]]) -> std::io::Result<usize> {
        let n = frames.len().min(MAX_TX_BATCH);
        let mut iov: [MaybeUninit<libc::iovec>; MAX_TX_BATCH] =
            [const { MaybeUninit::uninit() }; MAX_TX_BATCH];
        // SAFETY: mmsghdr is plain data; zero is valid (null pointers, zero lengths).
        let mut msgs: [libc::mmsghdr; MAX_TX_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above, sockaddr_ll is plain data.
        let mut addrs: [libc::sockaddr_ll; MAX_TX_BATCH] = unsafe { std::mem::zeroed() };
        let l3 = self.medium == Medium::Ip;
        for (i, f) in frames[..n].iter().enumerate() {
            iov[i].write(libc::iovec {
                iov_base: f.as_ptr() as *mut c_void,
                iov_len: f.len(),
            });
            msgs[i].msg_hdr.msg_iov = iov[i].as_mut_ptr();
            msgs[i].msg_hdr.msg_iovlen = 1;
            if l3 {
                addrs[i] = self.l3_addr(f);
                msgs[i].msg_hdr.msg_name = &mut addrs[i] as *mut libc::sockaddr_ll as *mut c_void;
                msgs[i].msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            }
        }
        let mut done = 0usize;
        while done < n {
            // SAFETY: msgs[done..n] point at initialised iovecs describing live frames.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().add(done),
                    (n - done) as c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if done == 0 {
                    return Err(e);
                }
                break;
            }
            if r == 0 {
                break;
            }
            done += r as usize;
        }
        Ok(done)
    }
}

impl AsRawFd for RawTx {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

enum Tx {
    Raw(RawTx),
    Pcap(Capture<Active>),
}

/// The pcap backend: one capture handle for RX and one injector for TX.
pub struct PcapIo {
    cfg: PcapConfig,
    rx: Capture<Active>,
    rx_fd: RawFd,
    /// The capture's framing (what is stripped, which medium the worker sees).
    datalink: Datalink,
    tx: Tx,
    /// TX slots; `tx_pending` of them hold frames not yet sent (each slot's length = frame length).
    tx_slots: Vec<Vec<u8>>,
    tx_pending: usize,
    stats: IoStats,
}

impl PcapIo {
    /// Opens capture and injection on `cfg.iface`.
    pub fn open(cfg: PcapConfig) -> Result<Self, PcapIoError> {
        let iface = cfg.iface.as_str();
        if_index(iface)?;
        if cfg.rx_batch == 0 {
            return Err(PcapIoError::Config {
                iface: iface.to_owned(),
                msg: "rx_batch must be at least 1".into(),
            });
        }
        let sockbuf = i32::try_from(cfg.sockbuf).map_err(|_| PcapIoError::Config {
            iface: iface.to_owned(),
            msg: format!("sockbuf {} is too large", cfg.sockbuf),
        })?;
        let snaplen = match cfg.snaplen {
            0 => auto_snaplen(iface),
            n => n,
        };
        let snaplen = i32::try_from(snaplen).map_err(|_| PcapIoError::Config {
            iface: iface.to_owned(),
            msg: format!("snaplen {} is too large", cfg.snaplen),
        })?;
        let what = "a pcap capture";
        let mut rx = Capture::from_device(iface)
            .map_err(|e| pcap_err(iface, "create", what, e))?
            .snaplen(snaplen)
            .promisc(false)
            .immediate_mode(true)
            .buffer_size(sockbuf)
            .timeout(100)
            .open()
            .map_err(|e| pcap_err(iface, "activate", what, e))?
            .setnonblock()
            .map_err(|e| pcap_err(iface, "setnonblock", what, e))?;
        let datalink = datalink_of(iface, &rx)?;
        rx.direction(pcap::Direction::In)
            .map_err(|e| pcap_err(iface, "setdirection(IN)", what, e))?;
        let filter = cfg.filter_expr();
        rx.filter(&filter, true).map_err(|e| PcapIoError::Pcap {
            iface: iface.to_owned(),
            op: "filter",
            msg: format!("{filter:?}: {e}"),
        })?;
        let rx_fd = rx.as_raw_fd();

        let tx = match cfg.tx {
            TxMethod::AfPacket => {
                Tx::Raw(RawTx::open(iface, cfg.qdisc_bypass)?.with_medium(datalink.medium()))
            }
            TxMethod::Pcap if matches!(datalink, Datalink::Cooked { .. }) => {
                return Err(PcapIoError::Config {
                    iface: iface.to_owned(),
                    msg: "libpcap cannot inject in cooked (LINUX_SLL) mode; use the AF_PACKET injector"
                        .into(),
                });
            }
            TxMethod::Pcap => {
                let what = "a pcap injection handle";
                let mut h = Capture::from_device(iface)
                    .map_err(|e| pcap_err(iface, "create", what, e))?
                    .snaplen(128)
                    .promisc(false)
                    .buffer_size(256 * 1024)
                    .open()
                    .map_err(|e| pcap_err(iface, "activate", what, e))?;
                // Never capture on the TX handle (upstream uses `less 0` too).
                h.direction(pcap::Direction::Out)
                    .map_err(|e| pcap_err(iface, "setdirection(OUT)", what, e))?;
                h.filter("less 0", true)
                    .map_err(|e| pcap_err(iface, "filter", what, e))?;
                Tx::Pcap(h)
            }
        };
        let batch = match cfg.tx {
            TxMethod::AfPacket => cfg.tx_batch.clamp(1, MAX_TX_BATCH),
            TxMethod::Pcap => 1,
        };
        tracing::debug!(
            iface,
            filter = %filter,
            sockbuf = cfg.sockbuf,
            tx = ?cfg.tx,
            tx_batch = batch,
            datalink = ?datalink,
            medium = %datalink.medium(),
            "pcap backend opened"
        );
        Ok(Self {
            cfg,
            rx,
            rx_fd,
            datalink,
            tx,
            tx_slots: (0..batch).map(|_| Vec::new()).collect(),
            tx_pending: 0,
            stats: IoStats::default(),
        })
    }

    /// The configuration this backend was opened with.
    pub fn config(&self) -> &PcapConfig {
        &self.cfg
    }

    /// The capture's datalink framing.
    pub fn datalink(&self) -> Datalink {
        self.datalink
    }

    fn dispatch(&mut self, f: &mut dyn FnMut(&[u8])) -> std::io::Result<usize> {
        let stats = &mut self.stats;
        let strip = self.datalink.strip();
        let r = self.rx.dispatch(Some(self.cfg.rx_batch), |p| {
            stats.rx_frames += 1;
            stats.rx_bytes += p.data.len() as u64;
            if p.header.len > p.header.caplen {
                stats.rx_truncated += 1;
            }
            // A cooked frame shorter than its pseudo-header is handed over empty (a parse error).
            f(p.data.get(strip..).unwrap_or(&[]));
        });
        r.map_err(|e| {
            std::io::Error::other(format!(
                "pcap read on interface \"{}\" failed: {e}",
                self.cfg.iface
            ))
        })
    }

    fn send_pending(&mut self) -> std::io::Result<()> {
        let n = self.tx_pending;
        if n == 0 {
            return Ok(());
        }
        self.tx_pending = 0;
        let result = match &mut self.tx {
            Tx::Raw(raw) if n == 1 => raw.send(&self.tx_slots[0]).map(|_| 1),
            Tx::Raw(raw) => {
                let mut refs: [&[u8]; MAX_TX_BATCH] = [&[]; MAX_TX_BATCH];
                for (r, s) in refs.iter_mut().zip(&self.tx_slots[..n]) {
                    *r = s;
                }
                raw.send_many(&refs[..n])
            }
            Tx::Pcap(h) => h
                .sendpacket(&self.tx_slots[0][..])
                .map(|_| 1)
                .map_err(|e| std::io::Error::other(e.to_string())),
        };
        let sent = *result.as_ref().unwrap_or(&0);
        for s in &self.tx_slots[..sent] {
            self.stats.tx_frames += 1;
            self.stats.tx_bytes += s.len() as u64;
        }
        let failed = (n - sent) as u64;
        self.stats.tx_errors += failed;
        match result {
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("send on interface \"{}\" failed: {e}", self.cfg.iface),
            )),
            Ok(_) if failed > 0 => Err(std::io::Error::other(format!(
                "send on interface \"{}\": only {sent} of {n} frames accepted",
                self.cfg.iface
            ))),
            Ok(_) => Ok(()),
        }
    }
}

impl PacketIo for PcapIo {
    fn recv_batch(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<usize> {
        let n = self.dispatch(f)?;
        if n > 0 || timeout.is_zero() {
            return Ok(n);
        }
        if !poll_readable(self.rx_fd, timeout)? {
            return Ok(0);
        }
        self.dispatch(f)
    }

    fn send_with(
        &mut self,
        max_len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> std::io::Result<()> {
        let slot = &mut self.tx_slots[self.tx_pending];
        if slot.len() < max_len {
            slot.resize(max_len, 0);
        }
        let len = fill(&mut slot[..max_len]);
        if len > max_len {
            self.stats.tx_errors += 1;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("fill returned {len} bytes, more than max_len {max_len}"),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        // Keep the capacity; the Vec length now records the frame length.
        slot.truncate(len);
        self.tx_pending += 1;
        if self.tx_pending == self.tx_slots.len() {
            self.send_pending()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_pending()
    }

    fn stats(&self) -> IoStats {
        let mut s = self.stats;
        let mut ps = RawPcapStat {
            ps_recv: 0,
            ps_drop: 0,
            ps_ifdrop: 0,
        };
        // SAFETY: the handle is live for `self`'s lifetime; `PcapIo` is not `Sync`, so no other
        // thread uses the handle concurrently; `ps` is a valid out-pointer.
        let r = unsafe { pcap_stats(self.rx.as_ptr() as *mut c_void, &mut ps) };
        if r == 0 {
            s.kernel_drops = u64::from(ps.ps_drop);
            s.if_drops = u64::from(ps.ps_ifdrop);
        }
        s
    }

    fn name(&self) -> &'static str {
        "pcap"
    }

    fn medium(&self) -> Medium {
        self.datalink.medium()
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.rx_fd)
    }
}

impl Drop for PcapIo {
    fn drop(&mut self) {
        if let Err(e) = self.send_pending() {
            tracing::warn!(iface = %self.cfg.iface, error = %e, "frames lost while closing pcap backend");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_expressions() {
        let mut c = PcapConfig::new("eth0", 9999);
        assert_eq!(c.filter_expr(), "tcp and dst port 9999");
        c.dst_host = Some("10.1.2.3".parse().unwrap());
        assert_eq!(
            c.filter_expr(),
            "tcp and dst port 9999 and dst host 10.1.2.3"
        );
        c.dst_host = Some("2001:db8::1".parse().unwrap());
        assert_eq!(
            c.filter_expr(),
            "tcp and dst port 9999 and dst host 2001:db8::1"
        );
    }

    #[test]
    fn datalinks_map_to_media() {
        assert_eq!(Datalink::from_dlt(DLT_EN10MB), Some(Datalink::Ethernet));
        assert_eq!(
            Datalink::from_dlt(DLT_EN10MB).unwrap().medium(),
            Medium::Ethernet
        );
        for dlt in [DLT_RAW, DLT_IPV4, DLT_IPV6, 101] {
            assert_eq!(Datalink::from_dlt(dlt), Some(Datalink::Raw), "{dlt}");
        }
        assert_eq!(Datalink::from_dlt(DLT_LINUX_SLL).unwrap().strip(), 16);
        assert_eq!(Datalink::from_dlt(DLT_LINUX_SLL2).unwrap().strip(), 20);
        assert_eq!(
            Datalink::from_dlt(DLT_LINUX_SLL).unwrap().medium(),
            Medium::Ip
        );
        assert_eq!(Datalink::from_dlt(DLT_RAW).unwrap().strip(), 0);
        // 127 = IEEE802_11_RADIO, 10 = FDDI, 9 = PPP (with its own header)
        for dlt in [127, 10, 9, 0] {
            assert_eq!(Datalink::from_dlt(dlt), None, "{dlt}");
        }
        assert_eq!(ip_protocol_be(&[0x45]), 0x0800u16.to_be());
        assert_eq!(ip_protocol_be(&[0x60]), 0x86DDu16.to_be());
        let e = PcapIoError::UnsupportedDatalink {
            iface: "fddi0".into(),
            dlt: 10,
            name: "FDDI".into(),
        };
        assert!(
            e.to_string().starts_with(
                "interface \"fddi0\" has pcap datalink FDDI (10): paqet runs on EN10MB"
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_interface_is_named() {
        let e = PcapIo::open(PcapConfig::new("nosuchif9", 1)).err().unwrap();
        assert!(matches!(e, PcapIoError::InterfaceNotFound { .. }), "{e:?}");
        assert_eq!(e.to_string(), "interface \"nosuchif9\" not found");
        let e = RawTx::open("nosuchif9", false).err().unwrap();
        assert_eq!(e.to_string(), "interface \"nosuchif9\" not found");
    }
}
