//! Server dial-target rules (`server.allow` / `server.deny`): parsing and matching, no I/O.
//!
//! An entry is `NET`, `NET:PORTS` with `NET` an IPv4 or IPv6 address with an optional `/prefix` (a bare
//! address is one host), IPv6 in brackets when ports follow (`[2001:db8::]/32:443`), and `PORTS` a port
//! or an inclusive range `LO-HI`. Without ports the entry covers every port.
//!
//! A target (an address after DNS resolution, and a port) is checked in this order:
//! 1. matching a `deny` entry → refused;
//! 2. a loopback (127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10) or unspecified (0.0.0.0/8, ::)
//!    address → refused unless an `allow` entry lying wholly inside that range matches it (so
//!    `0.0.0.0/0` does not open loopback, `127.0.0.1/32` does);
//! 3. `allow` set and no entry matching → refused;
//! 4. otherwise allowed.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched as the IPv4 address they carry. With both
//! lists empty the policy is off and every target is allowed (upstream's behaviour).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// One `allow`/`deny` entry: a network and an inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRule {
    net: IpAddr,
    prefix: u8,
    ports: (u16, u16),
}

/// Syntax accepted by [`TargetRule::from_str`], for error messages and the key table.
pub const TARGET_RULE_SYNTAX: &str =
    "CIDR with optional ports: \"10.0.0.0/8\", \"192.0.2.7\", \"0.0.0.0/0:443\", \"[::]/0:80-443\"";

/// IPv4-mapped IPv6 → IPv4; anything else unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// `ip` with every bit after `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl TargetRule {
    const fn v4(a: [u8; 4], prefix: u8) -> Self {
        TargetRule {
            net: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            prefix,
            ports: (0, u16::MAX),
        }
    }

    const fn v6(a: Ipv6Addr, prefix: u8) -> Self {
        TargetRule {
            net: IpAddr::V6(a),
            prefix,
            ports: (0, u16::MAX),
        }
    }

    /// Whether the network contains `ip` (already canonical).
    fn contains_ip(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }

    /// Whether the rule matches `ip` (already canonical) and `port`.
    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.contains_ip(ip) && (self.ports.0..=self.ports.1).contains(&port)
    }

    /// Whether this rule's whole network lies inside `outer`'s.
    fn within(&self, outer: &TargetRule) -> bool {
        self.prefix >= outer.prefix && outer.contains_ip(self.net)
    }
}

impl FromStr for TargetRule {
    type Err = String;

    /// Parses one entry; the error says what is wrong (without the key path).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        // Split off the ports: after `]…:` for bracketed IPv6, after the only `:` for IPv4.
        let (net_text, ports_text) = if let Some(rest) = s.strip_prefix('[') {
            let (addr, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: missing ']'"))?;
            let (prefix, ports) = match after.split_once(':') {
                Some((p, ports)) => (p, Some(ports)),
                None => (after, None),
            };
            if !prefix.is_empty() && !prefix.starts_with('/') {
                return Err(format!("{s:?}: unexpected {prefix:?} after ']'"));
            }
            (format!("{addr}{prefix}"), ports)
        } else if s.matches(':').count() == 1 {
            let (net, ports) = s.split_once(':').unwrap_or((s, ""));
            (net.to_string(), Some(ports))
        } else {
            (s.to_string(), None)
        };
        let (addr_text, prefix_text) = match net_text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net_text.as_str(), None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{s:?}: {addr_text:?} is not an IP address"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        let port = |t: &str| -> Result<u16, String> {
            t.parse::<u16>()
                .map_err(|_| format!("{s:?}: {t:?} is not a port (0..=65535)"))
        };
        let ports = match ports_text {
            None => (0, u16::MAX),
            Some(p) => match p.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(format!("{s:?}: port range {lo}-{hi} is empty"));
                    }
                    (lo, hi)
                }
                None => {
                    let p = port(p)?;
                    (p, p)
                }
            },
        };
        let net = mask(addr, prefix);
        Ok(TargetRule { net, prefix, ports })
    }
}

impl fmt::Display for TargetRule {
    /// The canonical form, which [`TargetRule::from_str`] reads back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all_ports = self.ports == (0, u16::MAX);
        match (self.net, all_ports) {
            (IpAddr::V4(a), _) => write!(f, "{a}/{}", self.prefix)?,
            (IpAddr::V6(a), true) => write!(f, "{a}/{}", self.prefix)?,
            (IpAddr::V6(a), false) => write!(f, "[{a}]/{}", self.prefix)?,
        }
        match self.ports {
            _ if all_ports => Ok(()),
            (lo, hi) if lo == hi => write!(f, ":{lo}"),
            (lo, hi) => write!(f, ":{lo}-{hi}"),
        }
    }
}

/// Ranges refused by default once a policy is set (loopback, link-local, unspecified).
const LOCAL: [TargetRule; 6] = [
    TargetRule::v4([127, 0, 0, 0], 8),
    TargetRule::v4([169, 254, 0, 0], 16),
    TargetRule::v4([0, 0, 0, 0], 8),
    TargetRule::v6(Ipv6Addr::LOCALHOST, 128),
    TargetRule::v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    TargetRule::v6(Ipv6Addr::UNSPECIFIED, 128),
];

/// Why a target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It matches a `server.deny` entry.
    Denied,
    /// Loopback, link-local or unspecified, and not explicitly allowed.
    Local,
    /// `server.allow` is set and no entry matches.
    NotAllowed,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Denied => "matches server.deny",
            Refusal::Local => "loopback/link-local target not explicitly in server.allow",
            Refusal::NotAllowed => "not in server.allow",
        })
    }
}

/// The server's dial-target policy (`server.allow`, `server.deny`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// `server.allow` entries.
    pub allow: Vec<TargetRule>,
    /// `server.deny` entries.
    pub deny: Vec<TargetRule>,
}

impl TargetPolicy {
    /// Whether any rule is set (off = every target allowed, as upstream).
    pub fn is_active(&self) -> bool {
        !(self.allow.is_empty() && self.deny.is_empty())
    }

    /// Checks one resolved target.
    pub fn check(&self, target: SocketAddr) -> Result<(), Refusal> {
        if !self.is_active() {
            return Ok(());
        }
        let ip = canonical(target.ip());
        let port = target.port();
        if self.deny.iter().any(|r| r.matches(ip, port)) {
            return Err(Refusal::Denied);
        }
        if let Some(local) = LOCAL.iter().find(|l| l.contains_ip(ip)) {
            let explicit = self
                .allow
                .iter()
                .any(|r| r.within(local) && r.matches(ip, port));
            return if explicit {
                Ok(())
            } else {
                Err(Refusal::Local)
            };
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|r| r.matches(ip, port)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }
}

/// Streams the server refused because of their target (`paqet_streams_refused_total{reason="target_denied"}`).
static TARGET_REFUSALS: AtomicU64 = AtomicU64::new(0);

/// Counts one refused target.
pub fn count_target_refusal() {
    TARGET_REFUSALS.fetch_add(1, Ordering::Relaxed);
}

/// Targets refused since the process started.
pub fn target_refusals() -> u64 {
    TARGET_REFUSALS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> TargetPolicy {
        let p = |l: &[&str]| l.iter().map(|s| s.parse().unwrap()).collect();
        TargetPolicy {
            allow: p(allow),
            deny: p(deny),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_canonically() {
        for (text, canon) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("192.0.2.7", "192.0.2.7/32"),
            ("0.0.0.0/0:443", "0.0.0.0/0:443"),
            ("192.0.2.0/24:80-443", "192.0.2.0/24:80-443"),
            ("[::]/0:80-443", "[::]/0:80-443"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("[2001:db8::1]:53", "[2001:db8::1]/128:53"),
            ("[::1]", "::1/128"),
        ] {
            let r: TargetRule = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.to_string(), canon, "{text}");
            assert_eq!(canon.parse::<TargetRule>(), Ok(r), "{canon}");
        }
    }

    #[test]
    fn rejects_bad_entries() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "example.com",
            "10.0.0.0/8:",
            "10.0.0.0/8:70000",
            "10.0.0.0/8:443-80",
            "[::1",
            "[::1]x",
            "::/0:443x",
            "10.0.0.0/x",
            // A v4-mapped address is matched as IPv4: its prefix is an IPv4 one.
            "::ffff:10.0.0.0/104",
        ] {
            assert!(bad.parse::<TargetRule>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn off_allows_everything() {
        let p = TargetPolicy::default();
        assert!(!p.is_active());
        assert_eq!(p.check(sa("127.0.0.1:22")), Ok(()));
    }

    #[test]
    fn ipv4_allow_and_ports() {
        let p = policy(&["10.0.0.0/8", "0.0.0.0/0:443"], &[]);
        assert_eq!(p.check(sa("10.9.8.7:22")), Ok(()));
        assert_eq!(p.check(sa("192.0.2.1:443")), Ok(()));
        assert_eq!(p.check(sa("192.0.2.1:80")), Err(Refusal::NotAllowed));
        assert_eq!(p.check(sa("11.0.0.1:22")), Err(Refusal::NotAllowed));
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policy(&["10.0.0.0/8"], &["10.1.0.0/16:22"]);
        assert_eq!(p.check(sa("10.1.2.3:22")), Err(Refusal::Denied));
        assert_eq!(p.check(sa("10.1.2.3:23")), Ok(()));
        // A deny list alone allows everything else but still protects loopback.
        let p = policy(&[], &["192.0.2.0/24"]);
        assert_eq!(p.check(sa("192.0.2.9:1")), Err(Refusal::Denied));
        assert_eq!(p.check(sa("198.51.100.1:1")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:8080")), Err(Refusal::Local));
    }

    #[test]
    fn loopback_and_link_local_need_an_explicit_allow() {
        let p = policy(&["0.0.0.0/0", "::/0"], &[]);
        for t in [
            "127.0.0.1:80",
            "127.5.5.5:80",
            "169.254.169.254:80",
            "0.0.0.0:80",
            "[::1]:80",
            "[fe80::1]:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert_eq!(p.check(sa(t)), Err(Refusal::Local), "{t}");
        }
        let p = policy(&["127.0.0.1:8080", "::1/128", "0.0.0.0/0"], &[]);
        assert_eq!(p.check(sa("127.0.0.1:8080")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:8081")), Err(Refusal::Local));
        assert_eq!(p.check(sa("127.0.0.2:8080")), Err(Refusal::Local));
        assert_eq!(p.check(sa("[::1]:1")), Ok(()));
        assert_eq!(p.check(sa("169.254.169.254:80")), Err(Refusal::Local));
    }

    #[test]
    fn ipv6_rules() {
        let p = policy(
            &["2001:db8::/32", "[::]/0:80-443"],
            &["[2001:db8:dead::]/48"],
        );
        assert_eq!(p.check(sa("[2001:db8::1]:22")), Ok(()));
        assert_eq!(p.check(sa("[2001:db8:dead::1]:22")), Err(Refusal::Denied));
        assert_eq!(p.check(sa("[2001:db9::1]:443")), Ok(()));
        assert_eq!(p.check(sa("[2001:db9::1]:444")), Err(Refusal::NotAllowed));
        // IPv6 rules never match IPv4 targets.
        assert_eq!(p.check(sa("192.0.2.1:443")), Err(Refusal::NotAllowed));
    }

    #[test]
    fn v4_mapped_targets_match_ipv4_rules() {
        let p = policy(&["10.0.0.0/8"], &["10.6.6.6"]);
        assert_eq!(p.check(sa("[::ffff:10.1.1.1]:80")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:10.6.6.6]:80")), Err(Refusal::Denied));
        assert_eq!(
            p.check(sa("[::ffff:11.1.1.1]:80")),
            Err(Refusal::NotAllowed)
        );
        // A v4-mapped rule is the IPv4 rule.
        let r: TargetRule = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(r.to_string(), "10.0.0.1/32");
    }
}
