//! Kernel lookups for what a configuration may omit: an interface's ifindex, MAC, MTU and
//! addresses, the next hop towards a destination and that next hop's MAC (the `router_mac`), and
//! the interface's [`Medium`] (Ethernet, or bare IP on tun/ppp/WireGuard: [`link_medium`]), which
//! decides whether MACs are needed at all ([`local_mac_for`], [`router_mac_for`]).
//!
//! Everything goes through a raw `NETLINK_ROUTE` socket with small hand-written messages, so it
//! works inside network namespaces — including a thread moved with `setns(2)`, where `/proc/net`
//! would still show the process's namespace. Replies are parsed defensively: malformed netlink
//! data yields [`RouteError::Malformed`], never a panic.

use std::ffi::{c_int, c_void, CString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::wire::envelope::Medium;

// Netlink / rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_TENTATIVE: u32 = 0x40;
const IFA_F_DADFAILED: u32 = 0x08;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80; // REACHABLE|STALE|DELAY|PROBE|NOARP|PERMANENT
/// Scope of host-only addresses (e.g. 127.0.0.1, ::1).
pub const RT_SCOPE_HOST: u8 = 254;
/// Scope of link-local addresses (fe80::/10).
pub const RT_SCOPE_LINK: u8 = 253;

/// Errors of the kernel lookups; each names what it was looking for.
#[derive(Debug, Error)]
pub enum RouteError {
    /// No interface of that name in the current network namespace.
    #[error("interface \"{iface}\" not found")]
    InterfaceNotFound { iface: String },
    /// A netlink request failed.
    #[error("netlink {op} failed: {source}")]
    Netlink {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel's reply could not be parsed.
    #[error("malformed netlink reply to {op}: {what}")]
    Malformed { op: String, what: String },
    /// The interface has no Ethernet address (e.g. a tun device).
    #[error("interface \"{iface}\" has no MAC address")]
    NoMac { iface: String },
    /// The interface has no usable address of that family.
    #[error("interface \"{iface}\" has no usable {family} address")]
    NoAddress { iface: String, family: &'static str },
    /// The kernel has no route to the destination through the interface.
    #[error("no route to {dst} via {iface}: {reason}")]
    NoRoute {
        dst: IpAddr,
        iface: String,
        reason: String,
    },
    /// The interface's link type carries neither Ethernet nor bare IP frames.
    #[error("interface \"{iface}\" has link type {arphrd} ({name}): paqet runs on Ethernet (ARPHRD 1) or on interfaces without a link header (tun/WireGuard 65534, ppp 512, ipip/gre/sit)")]
    UnsupportedLinkType {
        iface: String,
        arphrd: u16,
        name: &'static str,
    },
    /// A `router_mac` was configured for an interface whose frames carry no MAC addresses.
    #[error("network.{family}.router_mac is set, but interface \"{iface}\" has medium {medium} (no link header, no MAC addresses): remove network.{family}.router_mac")]
    RouterMacOnL3 {
        iface: String,
        family: &'static str,
        medium: Medium,
    },
    /// The next hop's MAC is not in the neighbour table even after probing.
    #[error("cannot resolve router_mac for {next_hop} via {iface}: no neighbour entry; set network.{family}.router_mac")]
    NoNeighbour {
        next_hop: IpAddr,
        iface: String,
        family: &'static str,
    },
}

fn family_key(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let m = mac;
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

// ---------------------------------------------------------------------------------------------
// Netlink plumbing

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one route attribute (type, value) to `buf`, padded to 4 bytes.
fn push_attr(buf: &mut Vec<u8>, ty: u16, val: &[u8]) {
    let len = 4 + val.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(val);
    buf.resize(align4(buf.len()), 0);
}

/// Iterates `(type, value)` over route attributes; stops with an error on a malformed one.
fn attrs<'a>(
    mut buf: &'a [u8],
    op: &str,
) -> impl Iterator<Item = Result<(u16, &'a [u8]), RouteError>> + 'a {
    let op = op.to_owned();
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            buf = &[];
            return Some(Err(RouteError::Malformed {
                op: op.clone(),
                what: format!("attribute type {ty} has length {len}"),
            }));
        }
        let val = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some(Ok((ty, val)))
    })
}

fn ip_from(family: u8, v: &[u8]) -> Option<IpAddr> {
    match (family as c_int, v.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
        (libc::AF_INET6, 16) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(v);
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

fn ip_bytes(ip: &IpAddr) -> (u8, Vec<u8>) {
    match ip {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    }
}

/// Callback for each netlink reply: `(message type, payload after the nlmsghdr)`.
type MsgHandler<'a> = dyn FnMut(u16, &[u8]) -> Result<(), RouteError> + 'a;

/// A `NETLINK_ROUTE` socket opened in the calling thread's network namespace.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> Result<Self, RouteError> {
        let err = |source| RouteError::Netlink {
            op: "socket".into(),
            source,
        };
        // SAFETY: plain syscall.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Bound the wait for a reply so a kernel that never answers cannot hang the caller.
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: valid fd; option value is a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        // SAFETY: sockaddr_nl is plain data.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid fd and sockaddr_nl.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Sends one request (`body` = fixed header + attributes) and calls `on_msg(type, payload)`
    /// for each reply message. A non-dump request ends after its first reply.
    fn request(
        &mut self,
        op: &str,
        ty: u16,
        flags: u16,
        body: &[u8],
        on_msg: &mut MsgHandler<'_>,
    ) -> Result<(), RouteError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
        msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: sockaddr_nl is plain data; pid 0 = the kernel.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        let nl_err = |source| RouteError::Netlink {
            op: op.to_owned(),
            source,
        };
        // SAFETY: valid fd, buffer and address.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const c_void,
                msg.len(),
                0,
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(nl_err(std::io::Error::last_os_error()));
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        loop {
            // SAFETY: valid fd; `buf` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr() as *mut c_void,
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(nl_err(e));
            }
            let mut data = &self.buf[..n as usize];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let mty = u16::from_ne_bytes([data[4], data[5]]);
                let mseq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(RouteError::Malformed {
                        op: op.to_owned(),
                        what: format!("message length {len} with {} bytes left", data.len()),
                    });
                }
                let payload = &data[NLMSG_HDRLEN..len];
                data = &data[align4(len).min(data.len())..];
                if mseq != seq {
                    continue; // a stale reply to an earlier request
                }
                match mty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        if payload.len() < 4 {
                            return Err(RouteError::Malformed {
                                op: op.to_owned(),
                                what: "short NLMSG_ERROR".into(),
                            });
                        }
                        let code =
                            i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        if code == 0 {
                            return Ok(());
                        }
                        return Err(nl_err(std::io::Error::from_raw_os_error(-code)));
                    }
                    _ => {
                        on_msg(mty, payload)?;
                        if !dump {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Links and addresses

/// What the kernel knows about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Ethernet address, if the link has a 6-byte one.
    pub mac: Option<[u8; 6]>,
    /// MTU in bytes.
    pub mtu: u32,
    /// ARPHRD type (`ifinfomsg.ifi_type`, as `/sys/class/net/<if>/type`): 1 Ethernet, 65534 tun, ...
    pub arphrd: u16,
}

impl LinkInfo {
    /// The medium of the link, or [`RouteError::UnsupportedLinkType`].
    pub fn medium(&self) -> Result<Medium, RouteError> {
        Medium::from_arphrd(self.arphrd).ok_or_else(|| RouteError::UnsupportedLinkType {
            iface: self.name.clone(),
            arphrd: self.arphrd,
            name: Medium::arphrd_name(self.arphrd),
        })
    }
}

/// One address configured on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// `RT_SCOPE_*` (0 = global, [`RT_SCOPE_LINK`], [`RT_SCOPE_HOST`]).
    pub scope: u8,
    /// Still doing duplicate-address detection (IPv6), or DAD failed: not usable yet.
    pub tentative: bool,
}

/// The interface index of `iface` in the calling thread's namespace.
pub fn ifindex(iface: &str) -> Result<u32, RouteError> {
    let not_found = || RouteError::InterfaceNotFound {
        iface: iface.to_owned(),
    };
    let c = CString::new(iface).map_err(|_| not_found())?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(not_found());
    }
    Ok(idx)
}

/// Name, index, MAC and MTU of `iface`.
pub fn link_info(iface: &str) -> Result<LinkInfo, RouteError> {
    let idx = ifindex(iface)?;
    let mut nl = Netlink::open()?;
    // struct ifinfomsg { u8 family, u8 pad, u16 type, i32 index, u32 flags, u32 change }
    let mut body = vec![0u8; 16];
    body[4..8].copy_from_slice(&(idx as i32).to_ne_bytes());
    let op = format!("RTM_GETLINK for \"{iface}\"");
    let mut info = None;
    nl.request(&op, RTM_GETLINK, 0, &body, &mut |ty, p| {
        if ty != RTM_NEWLINK {
            return Ok(());
        }
        if p.len() < 16 {
            return Err(RouteError::Malformed {
                op: op.clone(),
                what: "short ifinfomsg".into(),
            });
        }
        let mut li = LinkInfo {
            name: iface.to_owned(),
            ifindex: i32::from_ne_bytes([p[4], p[5], p[6], p[7]]) as u32,
            mac: None,
            mtu: 0,
            arphrd: u16::from_ne_bytes([p[2], p[3]]),
        };
        for a in attrs(&p[16..], &op) {
            let (aty, v) = a?;
            match aty {
                IFLA_ADDRESS if v.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(v);
                    li.mac = Some(m);
                }
                IFLA_MTU if v.len() == 4 => li.mtu = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
                IFLA_IFNAME => {
                    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
                    li.name = String::from_utf8_lossy(&v[..end]).into_owned();
                }
                _ => {}
            }
        }
        info = Some(li);
        Ok(())
    })?;
    info.ok_or(RouteError::InterfaceNotFound {
        iface: iface.to_owned(),
    })
}

/// The Ethernet address of `iface`.
pub fn mac(iface: &str) -> Result<[u8; 6], RouteError> {
    link_info(iface)?.mac.ok_or(RouteError::NoMac {
        iface: iface.to_owned(),
    })
}

/// The [`Medium`] of `iface` from its ARPHRD type (read over rtnetlink, so correct in a thread moved
/// into another network namespace; the same value as `/sys/class/net/<if>/type`).
pub fn link_medium(iface: &str) -> Result<Medium, RouteError> {
    link_info(iface)?.medium()
}

/// The Ethernet source address of frames on `iface`: its MAC on [`Medium::Ethernet`], unused (zero)
/// on [`Medium::Ip`].
pub fn local_mac_for(iface: &str, medium: Medium) -> Result<[u8; 6], RouteError> {
    match medium {
        Medium::Ethernet => mac(iface),
        Medium::Ip => Ok([0; 6]),
    }
}

/// The Ethernet destination for the `family` (`"ipv4"` / `"ipv6"`) frames to `dst` out of `iface`:
/// on [`Medium::Ethernet`] the configured `router_mac` or the resolved next hop's MAC
/// ([`resolve_router_mac`]); on [`Medium::Ip`] nothing is resolved (zero) and a configured
/// `router_mac` is refused ([`RouteError::RouterMacOnL3`]): it would mean the configuration was
/// written for another interface.
pub fn router_mac_for(
    iface: &str,
    medium: Medium,
    family: &'static str,
    configured: Option<[u8; 6]>,
    dst: IpAddr,
) -> Result<[u8; 6], RouteError> {
    match (medium, configured) {
        (Medium::Ip, Some(_)) => Err(RouteError::RouterMacOnL3 {
            iface: iface.to_owned(),
            family,
            medium,
        }),
        (Medium::Ip, None) => Ok([0; 6]),
        (Medium::Ethernet, Some(m)) => Ok(m),
        (Medium::Ethernet, None) => resolve_router_mac(iface, dst),
    }
}

/// The MTU of `iface`.
pub fn mtu(iface: &str) -> Result<u32, RouteError> {
    Ok(link_info(iface)?.mtu)
}

/// All addresses on `iface`, IPv4 first, in kernel order.
pub fn addresses(iface: &str) -> Result<Vec<IfAddr>, RouteError> {
    let idx = ifindex(iface)?;
    let mut nl = Netlink::open()?;
    let op = format!("RTM_GETADDR for \"{iface}\"");
    let mut out = Vec::new();
    // struct ifaddrmsg { u8 family, u8 prefixlen, u8 flags, u8 scope, u32 index }
    let body = [0u8; 8]; // AF_UNSPEC dump
    nl.request(&op, RTM_GETADDR, NLM_F_DUMP, &body, &mut |ty, p| {
        if ty != RTM_NEWADDR {
            return Ok(());
        }
        if p.len() < 8 {
            return Err(RouteError::Malformed {
                op: op.clone(),
                what: "short ifaddrmsg".into(),
            });
        }
        let (family, prefix_len, flags8, scope) = (p[0], p[1], p[2], p[3]);
        if u32::from_ne_bytes([p[4], p[5], p[6], p[7]]) != idx {
            return Ok(());
        }
        let (mut local, mut address, mut flags) = (None, None, u32::from(flags8));
        for a in attrs(&p[8..], &op) {
            let (aty, v) = a?;
            match aty {
                IFA_LOCAL => local = ip_from(family, v),
                IFA_ADDRESS => address = ip_from(family, v),
                IFA_FLAGS if v.len() == 4 => flags = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
                _ => {}
            }
        }
        // IPv4: IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
        if let Some(addr) = local.or(address) {
            out.push(IfAddr {
                addr,
                prefix_len,
                scope,
                tentative: flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) != 0,
            });
        }
        Ok(())
    })?;
    out.sort_by_key(|a| a.addr.is_ipv6());
    Ok(out)
}

/// The first global-scope IPv4 address of `iface`.
pub fn ipv4_addr(iface: &str) -> Result<Ipv4Addr, RouteError> {
    addresses(iface)?
        .into_iter()
        .find_map(|a| match a.addr {
            IpAddr::V4(v4) if a.scope < RT_SCOPE_LINK => Some(v4),
            _ => None,
        })
        .ok_or(RouteError::NoAddress {
            iface: iface.to_owned(),
            family: "IPv4",
        })
}

/// The first non-tentative global-scope IPv6 address of `iface` (link-local ones are skipped:
/// paqet needs an address that routes).
pub fn ipv6_addr(iface: &str) -> Result<Ipv6Addr, RouteError> {
    addresses(iface)?
        .into_iter()
        .find_map(|a| match a.addr {
            IpAddr::V6(v6) if a.scope < RT_SCOPE_LINK && !a.tentative => Some(v6),
            _ => None,
        })
        .ok_or(RouteError::NoAddress {
            iface: iface.to_owned(),
            family: "IPv6",
        })
}

// ---------------------------------------------------------------------------------------------
// Routes and neighbours

/// Where frames towards a destination go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    /// The gateway, or the destination itself when it is on-link.
    pub addr: IpAddr,
    /// True when `addr` is a gateway (router), false when the destination is on-link.
    pub via_gateway: bool,
    /// Outgoing interface index.
    pub ifindex: u32,
    /// Preferred source address of the route, if the kernel gave one.
    pub src: Option<IpAddr>,
}

/// Result of one `RTM_GETROUTE` query.
enum Lookup {
    /// A unicast route: (gateway, oif, preferred source).
    Unicast(Option<IpAddr>, Option<u32>, Option<IpAddr>),
    /// Anything else, with a human reason.
    Unusable(String),
}

/// One kernel route query for `dst`, optionally constrained to output interface `oif`.
fn route_get(dst: IpAddr, oif: Option<u32>, op: &str) -> Result<Lookup, RouteError> {
    let mut nl = Netlink::open()?;
    let (family, dbytes) = ip_bytes(&dst);
    // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type, u32 flags }
    let mut body = vec![0u8; 12];
    body[0] = family;
    body[1] = (dbytes.len() * 8) as u8;
    push_attr(&mut body, RTA_DST, &dbytes);
    if let Some(oif) = oif {
        push_attr(&mut body, RTA_OIF, &oif.to_ne_bytes());
    }
    let mut out = None;
    let r = nl.request(op, RTM_GETROUTE, 0, &body, &mut |ty, p| {
        if ty != RTM_NEWROUTE {
            return Ok(());
        }
        if p.len() < 12 {
            return Err(RouteError::Malformed {
                op: op.to_owned(),
                what: "short rtmsg".into(),
            });
        }
        let (rfamily, rtype) = (p[0], p[7]);
        let (mut gw, mut oif, mut src) = (None, None, None);
        for a in attrs(&p[12..], op) {
            let (aty, v) = a?;
            match aty {
                RTA_GATEWAY => gw = ip_from(rfamily, v),
                RTA_OIF if v.len() == 4 => oif = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]])),
                RTA_PREFSRC => src = ip_from(rfamily, v),
                _ => {}
            }
        }
        out = Some(match rtype {
            RTN_UNICAST => Lookup::Unicast(gw, oif, src),
            RTN_LOCAL => Lookup::Unusable("it is a local address".into()),
            t => Lookup::Unusable(format!("route type {t} is not unicast")),
        });
        Ok(())
    });
    match r {
        Err(RouteError::Netlink { source, .. }) => Ok(Lookup::Unusable(source.to_string())),
        Err(e) => Err(e),
        Ok(()) => {
            Ok(out.unwrap_or_else(|| Lookup::Unusable("the kernel returned no route".into())))
        }
    }
}

/// True when `ip` lies inside `net/len`.
fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let (a, b, bits): (u128, u128, u32) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a).into(), u32::from(b).into(), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    let len = u32::from(len).min(bits);
    if len == 0 {
        return true;
    }
    let shift = bits - len;
    (a >> shift) == (b >> shift)
}

/// Finds the next hop towards `dst` out of `iface`: the kernel's normal route if it leaves through
/// `iface`; otherwise a route constrained to `iface` (a gateway through it, or `dst` inside one of
/// its connected prefixes). Anything else is [`RouteError::NoRoute`].
pub fn next_hop(iface: &str, dst: IpAddr) -> Result<NextHop, RouteError> {
    let idx = ifindex(iface)?;
    let op = format!("RTM_GETROUTE to {dst} via \"{iface}\"");
    let no_route = |reason: String| RouteError::NoRoute {
        dst,
        iface: iface.to_owned(),
        reason,
    };
    let hop = |gw: Option<IpAddr>, src| NextHop {
        addr: gw.unwrap_or(dst),
        via_gateway: gw.is_some(),
        ifindex: idx,
        src,
    };
    let reason = match route_get(dst, None, &op)? {
        Lookup::Unicast(gw, oif, src) => match oif.unwrap_or(idx) {
            o if o == idx => return Ok(hop(gw, src)),
            o => format!("the kernel routes it via ifindex {o}"),
        },
        Lookup::Unusable(r) => r,
    };
    // Constrained to the interface, the kernel assumes "on-link" when no route matches, so only
    // accept that answer if `dst` really is inside a prefix configured on the interface.
    if let Lookup::Unicast(gw, _, src) = route_get(dst, Some(idx), &op)? {
        if gw.is_some()
            || addresses(iface)?
                .iter()
                .any(|a| in_prefix(dst, a.addr, a.prefix_len))
        {
            return Ok(hop(gw, src));
        }
    }
    Err(no_route(reason))
}

/// The neighbour-table MAC of `addr` on interface `ifindex`, if the entry is usable.
pub fn neighbour(ifindex: u32, addr: IpAddr) -> Result<Option<[u8; 6]>, RouteError> {
    let mut nl = Netlink::open()?;
    let (family, _) = ip_bytes(&addr);
    // struct ndmsg { u8 family, u8 pad1, u16 pad2, i32 ifindex, u16 state, u8 flags, u8 type }
    let mut body = vec![0u8; 12];
    body[0] = family;
    body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    let op = format!("RTM_GETNEIGH for {addr}");
    let mut found = None;
    nl.request(&op, RTM_GETNEIGH, NLM_F_DUMP, &body, &mut |ty, p| {
        if ty != RTM_NEWNEIGH || found.is_some() {
            return Ok(());
        }
        if p.len() < 12 {
            return Err(RouteError::Malformed {
                op: op.clone(),
                what: "short ndmsg".into(),
            });
        }
        let nfamily = p[0];
        let nidx = i32::from_ne_bytes([p[4], p[5], p[6], p[7]]) as u32;
        let state = u16::from_ne_bytes([p[8], p[9]]);
        if nidx != ifindex || state & NUD_VALID == 0 {
            return Ok(());
        }
        let (mut dst, mut ll) = (None, None);
        for a in attrs(&p[12..], &op) {
            let (aty, v) = a?;
            match aty {
                NDA_DST => dst = ip_from(nfamily, v),
                NDA_LLADDR if v.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(v);
                    ll = Some(m);
                }
                _ => {}
            }
        }
        if dst == Some(addr) {
            found = ll;
        }
        Ok(())
    })?;
    Ok(found)
}

/// Makes the kernel resolve `addr`'s link-layer address by sending one UDP datagram to its
/// discard port (9) out of `iface`. This is traffic to the next hop itself.
fn probe_neighbour(iface: &str, ifindex: u32, addr: IpAddr) -> std::io::Result<()> {
    let (bind, target): (SocketAddr, SocketAddr) = match addr {
        IpAddr::V4(a) => (
            "0.0.0.0:0".parse().expect("literal"),
            SocketAddr::from((a, 9)),
        ),
        IpAddr::V6(a) => (
            "[::]:0".parse().expect("literal"),
            SocketAddr::V6(SocketAddrV6::new(a, 9, 0, ifindex)),
        ),
    };
    let sock = UdpSocket::bind(bind)?;
    let name = iface.as_bytes();
    // SAFETY: valid fd; the option value is the interface name bytes.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr() as *const c_void,
            name.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.send_to(b"paqet-dp neighbour probe", target)?;
    Ok(())
}

/// Resolves the Ethernet destination (`router_mac`) for `dst` out of `iface`: finds the next hop
/// (gateway or `dst` itself), looks it up in the neighbour table and, if missing, probes it and
/// re-reads for up to one second.
pub fn resolve_router_mac(iface: &str, dst: IpAddr) -> Result<[u8; 6], RouteError> {
    resolve_router_mac_within(iface, dst, Duration::from_secs(1))
}

/// [`resolve_router_mac`] with an explicit time budget for neighbour resolution.
pub fn resolve_router_mac_within(
    iface: &str,
    dst: IpAddr,
    budget: Duration,
) -> Result<[u8; 6], RouteError> {
    let hop = next_hop(iface, dst)?;
    if let Some(mac) = neighbour(hop.ifindex, hop.addr)? {
        return Ok(mac);
    }
    let deadline = Instant::now() + budget;
    let mut next_probe = Instant::now();
    loop {
        if Instant::now() >= next_probe {
            if let Err(e) = probe_neighbour(iface, hop.ifindex, hop.addr) {
                tracing::debug!(iface, next_hop = %hop.addr, error = %e, "neighbour probe failed");
            }
            next_probe = Instant::now() + Duration::from_millis(200);
        }
        std::thread::sleep(Duration::from_millis(10));
        if let Some(mac) = neighbour(hop.ifindex, hop.addr)? {
            tracing::debug!(iface, next_hop = %hop.addr, mac = %format_mac(&mac), "router_mac resolved");
            return Ok(mac);
        }
        if Instant::now() >= deadline {
            return Err(RouteError::NoNeighbour {
                next_hop: hop.addr,
                iface: iface.to_owned(),
                family: family_key(&dst),
            });
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns the new `(soft, hard)`.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    // SAFETY: rlimit is plain data and a valid out-pointer.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if rl.rlim_cur < rl.rlim_max {
        let want = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: valid in-pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot raise RLIMIT_NOFILE to {}: {e}", rl.rlim_max),
            ));
        }
        rl = want;
    }
    Ok((rl.rlim_cur as u64, rl.rlim_max as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_round_trip_and_malformed() {
        let mut b = Vec::new();
        push_attr(&mut b, 7, &[1, 2, 3]);
        push_attr(&mut b, 9, &[4, 5, 6, 7]);
        assert_eq!(b.len(), 8 + 8);
        let got: Vec<_> = attrs(&b, "t").map(|a| a.unwrap()).collect();
        assert_eq!(
            got,
            vec![(7u16, &[1u8, 2, 3][..]), (9u16, &[4u8, 5, 6, 7][..])]
        );
        // Length larger than the buffer: an error, not a panic.
        let bad = [0xff, 0x00, 0x01, 0x00, 0xaa];
        let r: Vec<_> = attrs(&bad, "t").collect();
        assert!(matches!(r[0], Err(RouteError::Malformed { .. })));
        // Length below the header size.
        let bad = [0x02, 0x00, 0x01, 0x00];
        assert!(attrs(&bad, "t").next().unwrap().is_err());
    }

    #[test]
    fn loopback_is_found() {
        let li = link_info("lo").unwrap();
        assert_eq!(li.ifindex, ifindex("lo").unwrap());
        assert!(li.mtu > 0);
        assert_eq!(li.name, "lo");
        let addrs = addresses("lo").unwrap();
        assert!(
            addrs
                .iter()
                .any(|a| a.addr == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addrs:?}"
        );
    }

    #[test]
    fn errors_name_the_interface() {
        assert_eq!(
            ifindex("nosuchif9").unwrap_err().to_string(),
            "interface \"nosuchif9\" not found"
        );
        assert!(matches!(
            mac("nosuchif9"),
            Err(RouteError::InterfaceNotFound { .. })
        ));
        let e = RouteError::NoNeighbour {
            next_hop: "10.0.0.1".parse().unwrap(),
            iface: "eth0".into(),
            family: "ipv4",
        };
        assert_eq!(
            e.to_string(),
            "cannot resolve router_mac for 10.0.0.1 via eth0: no neighbour entry; set network.ipv4.router_mac"
        );
    }

    #[test]
    fn medium_of_loopback_and_link_types() {
        let li = link_info("lo").unwrap();
        assert_eq!(li.arphrd, 772, "lo is ARPHRD_LOOPBACK");
        assert_eq!(link_medium("lo").unwrap(), Medium::Ethernet);
        assert!(matches!(
            link_medium("nosuchif9"),
            Err(RouteError::InterfaceNotFound { .. })
        ));
        let odd = LinkInfo {
            name: "wlan0mon".into(),
            ifindex: 7,
            mac: None,
            mtu: 1500,
            arphrd: 803,
        };
        let e = odd.medium().unwrap_err();
        assert!(
            e.to_string().starts_with(
                "interface \"wlan0mon\" has link type 803 (unknown): paqet runs on Ethernet"
            ),
            "{e}"
        );
        let tun = LinkInfo {
            arphrd: 65534,
            ..odd
        };
        assert_eq!(tun.medium().unwrap(), Medium::Ip);
    }

    #[test]
    fn router_mac_on_l3_is_refused_and_not_resolved() {
        let dst: IpAddr = "10.0.0.1".parse().unwrap();
        let e =
            router_mac_for("tun0", Medium::Ip, "ipv4", Some([2, 0, 0, 0, 0, 1]), dst).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network.ipv4.router_mac is set, but interface \"tun0\" has medium ip (no link header, no MAC \
             addresses): remove network.ipv4.router_mac"
        );
        let e = router_mac_for("wg0", Medium::Ip, "ipv6", Some([0; 6]), dst).unwrap_err();
        assert!(e.to_string().contains("network.ipv6.router_mac"), "{e}");
        // No lookup on L3: an interface that does not exist still gives the zero MAC.
        assert_eq!(
            router_mac_for("nosuchif9", Medium::Ip, "ipv4", None, dst).unwrap(),
            [0; 6]
        );
        assert_eq!(local_mac_for("nosuchif9", Medium::Ip).unwrap(), [0; 6]);
        // Ethernet: the configured MAC wins, otherwise the lookup runs (and names the interface).
        assert_eq!(
            router_mac_for("nosuchif9", Medium::Ethernet, "ipv4", Some([2; 6]), dst).unwrap(),
            [2; 6]
        );
        assert!(matches!(
            router_mac_for("nosuchif9", Medium::Ethernet, "ipv4", None, dst),
            Err(RouteError::InterfaceNotFound { .. })
        ));
        assert!(local_mac_for("nosuchif9", Medium::Ethernet).is_err());
    }

    #[test]
    fn local_destination_is_not_a_route() {
        let e = next_hop("lo", "127.0.0.1".parse().unwrap()).unwrap_err();
        assert!(matches!(e, RouteError::NoRoute { .. }), "{e:?}");
    }

    #[test]
    fn nofile_soft_reaches_hard() {
        let (soft, hard) = raise_nofile_limit().unwrap();
        assert_eq!(soft, hard);
    }

    #[test]
    fn prefix_matching() {
        let p = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_prefix(p("10.1.2.3"), p("10.1.0.0"), 16));
        assert!(!in_prefix(p("10.2.2.3"), p("10.1.0.0"), 16));
        assert!(in_prefix(p("1.2.3.4"), p("9.9.9.9"), 0));
        assert!(in_prefix(p("fd00::5"), p("fd00::1"), 64));
        assert!(!in_prefix(p("fd01::5"), p("fd00::1"), 64));
        assert!(!in_prefix(p("10.0.0.1"), p("fd00::1"), 0));
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(
            format_mac(&[0xaa, 0xbb, 0x0c, 0, 1, 0xff]),
            "aa:bb:0c:00:01:ff"
        );
    }
}
