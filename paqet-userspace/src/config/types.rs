//! Small typed values used by the configuration: `host:port` endpoints, MAC addresses, enums.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// A `host:port` endpoint as Go's `net.SplitHostPort` understands it: `host:port`, `[v6]:port` or `:port`
/// (empty host = all interfaces / unspecified). The host may be a name (resolved later, never here).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host part without brackets; may be empty.
    pub host: String,
    /// Port number (0 allowed by the parser; callers check their own range).
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`; the error text says what is wrong (without the key path).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let end = rest
                .find(']')
                .ok_or_else(|| "missing ']' in address".to_string())?;
            let host = &rest[..end];
            let after = &rest[end + 1..];
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| "missing port (expected [host]:port)".to_string())?;
            (host, port)
        } else {
            let idx = s
                .rfind(':')
                .ok_or_else(|| "missing port (expected host:port)".to_string())?;
            let host = &s[..idx];
            if host.contains(':') {
                return Err(
                    "too many colons (an IPv6 host must be written [addr]:port)".to_string()
                );
            }
            (host, &s[idx + 1..])
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("port {port:?} is not a number"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("port {port} is out of range 0..=65535"))?;
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }

    /// The host as an IP literal, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The endpoint as a socket address when the host is an IP literal (or empty → `0.0.0.0`).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        if self.host.is_empty() {
            return Some(SocketAddr::new(IpAddr::from([0u8, 0, 0, 0]), self.port));
        }
        self.ip().map(|ip| SocketAddr::new(ip, self.port))
    }

    /// Resolves the endpoint (IP literals without any lookup; names through the system resolver).
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        if let Some(sa) = self.socket_addr() {
            return Ok(sa);
        }
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("host {:?} resolved to no address", self.host),
                )
            })
    }

    /// True when the host is `localhost` or a loopback IP literal.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost") || self.ip().is_some_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    /// Accepts `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` and `aabb.ccdd.eeff` (Go's `net.ParseMAC`, 48-bit).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)");
        if !s.is_ascii() {
            return Err(bad());
        }
        let hex: String = if s.len() == 17 {
            let sep = s.as_bytes()[2];
            if sep != b':' && sep != b'-' {
                return Err(bad());
            }
            let mut out = String::with_capacity(12);
            for (i, part) in s.split(sep as char).enumerate() {
                if i >= 6 || part.len() != 2 {
                    return Err(bad());
                }
                out.push_str(part);
            }
            out
        } else if s.len() == 14 {
            let parts: Vec<&str> = s.split('.').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.len() != 4) {
                return Err(bad());
            }
            parts.concat()
        } else {
            return Err(bad());
        };
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Generates a string-backed enum with `as_str`, `ALL`, `FromStr` and `Display`.
macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $var),+ }
        impl $name {
            /// Every accepted spelling, in documentation order.
            pub const ALL: &'static [&'static str] = &[$($s),+];
            /// The configuration spelling.
            pub fn as_str(self) -> &'static str { match self { $($name::$var => $s),+ } }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok($name::$var),)+ _ => Err(format!("must be one of {}", Self::ALL.join(", "))) }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

str_enum!(
    /// Which end of the tunnel this process is.
    Role { Client = "client", Server = "server" }
);

str_enum!(
    /// `log.level` (upstream `flog`: `none` silences everything).
    LogLevel { None = "none", Debug = "debug", Info = "info", Warn = "warn", Error = "error", Fatal = "fatal" }
);

str_enum!(
    /// `transport.kcp.mode` presets (spec §2.2).
    KcpMode { Normal = "normal", Fast = "fast", Fast2 = "fast2", Fast3 = "fast3", Manual = "manual" }
);

str_enum!(
    /// `forward[].protocol`.
    ForwardProtocol { Tcp = "tcp", Udp = "udp" }
);

str_enum!(
    /// `io.backend`: how packets are captured and injected.
    IoBackend {
        /// AF_XDP when the driver and privileges allow it, else pcap.
        Auto = "auto",
        /// AF_XDP sockets steered by the XDP program.
        Afxdp = "afxdp",
        /// libpcap capture + raw injection (upstream's approach).
        Pcap = "pcap"
    }
);

/// `io.cpus`: where the XDP workers pin themselves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CpuPin {
    /// Worker *i* on the *i*-th CPU of the process's affinity mask (wrapping).
    #[default]
    Auto,
    /// No pinning: the scheduler places the workers.
    None,
    /// Worker *i* on the *i*-th CPU of this list (wrapping), in the order given.
    Cpus(Vec<u32>),
}

/// Highest CPU number `io.cpus` accepts (the kernel's default `CONFIG_NR_CPUS` ceiling for `cpu_set_t`).
pub const MAX_CPU: u32 = 1023;

impl FromStr for CpuPin {
    type Err = String;
    /// `auto`, `none`, or a Linux CPU list: comma-separated CPUs and inclusive ranges (`0-3,6`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!(
                "{why}; must be auto, none or a CPU list such as \"0-3,6\" (CPUs 0..={MAX_CPU})"
            )
        };
        match s.trim() {
            "auto" => return Ok(CpuPin::Auto),
            "none" => return Ok(CpuPin::None),
            "" => return Err(bad("empty".into())),
            _ => {}
        }
        let cpu = |t: &str| -> Result<u32, String> {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|&c| c <= MAX_CPU)
                .ok_or_else(|| bad(format!("{t:?} is not a CPU number")))
        };
        let mut out: Vec<u32> = Vec::new();
        for part in s.split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (cpu(a)?, cpu(b)?),
                None => (cpu(part)?, cpu(part)?),
            };
            if a > b {
                return Err(bad(format!("range {part:?} runs backwards")));
            }
            for c in a..=b {
                if out.contains(&c) {
                    return Err(bad(format!("CPU {c} is listed twice")));
                }
                out.push(c);
            }
        }
        Ok(CpuPin::Cpus(out))
    }
}

impl fmt::Display for CpuPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuPin::Auto => f.write_str("auto"),
            CpuPin::None => f.write_str("none"),
            CpuPin::Cpus(v) => {
                let parts: Vec<String> = v.iter().map(u32::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// The block ciphers kcp-go knows (`transport.kcp.block`); the crypt module parses the string.
pub const BLOCK_MODES: &[&str] = &[
    "aes",
    "aes-128",
    "aes-128-gcm",
    "aes-192",
    "salsa20",
    "blowfish",
    "twofish",
    "cast5",
    "3des",
    "tea",
    "xtea",
    "xor",
    "sm4",
    "none",
    "null",
    "noise",
];

/// TCP flag letters accepted in `network.tcp.*_flag` entries.
pub const TCP_FLAG_LETTERS: &str = "FSRPAUECN";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            HostPort::parse(":9999").unwrap(),
            HostPort {
                host: String::new(),
                port: 9999
            }
        );
        let v6 = HostPort::parse("[2001:db8::1]:0").unwrap();
        assert_eq!(v6.host, "2001:db8::1");
        assert_eq!(v6.to_string(), "[2001:db8::1]:0");
        assert_eq!(HostPort::parse("example.org:80").unwrap().ip(), None);
        assert!(HostPort::parse("1.2.3.4").is_err());
        assert!(HostPort::parse("1.2.3.4:70000")
            .unwrap_err()
            .contains("70000"));
        assert!(HostPort::parse("::1:80").is_err());
        assert!(HostPort::parse("[::1]80").is_err());
        assert!(HostPort::parse("h:").is_err());
        assert!(HostPort::parse("localhost:6060").unwrap().is_loopback());
        assert!(!HostPort::parse("0.0.0.0:6060").unwrap().is_loopback());
    }

    #[test]
    fn mac_forms() {
        let m: MacAddr = "AA:bb:cc:dd:ee:0f".parse().unwrap();
        assert_eq!(m.0, [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]);
        assert_eq!(m.to_string(), "aa:bb:cc:dd:ee:0f");
        assert_eq!("aa-bb-cc-dd-ee-0f".parse::<MacAddr>().unwrap(), m);
        assert_eq!("aabb.ccdd.ee0f".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:gg",
            "aa:bb-cc:dd:ee:ff",
            "aabbccddeeff",
            "é1:bb:cc:dd:ee:f",
            "aéb.ccdd.ee0f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod cpu_pin_tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn cpu_lists_parse_like_taskset() {
        assert_eq!("auto".parse::<CpuPin>().unwrap(), CpuPin::Auto);
        assert_eq!("none".parse::<CpuPin>().unwrap(), CpuPin::None);
        assert_eq!("3".parse::<CpuPin>().unwrap(), CpuPin::Cpus(vec![3]));
        assert_eq!(
            "0-3,6".parse::<CpuPin>().unwrap(),
            CpuPin::Cpus(vec![0, 1, 2, 3, 6])
        );
        assert_eq!(
            "6, 2-3".parse::<CpuPin>().unwrap(),
            CpuPin::Cpus(vec![6, 2, 3])
        );
        assert_eq!(CpuPin::Cpus(vec![0, 1, 2, 3, 6]).to_string(), "0,1,2,3,6");
    }

    #[test]
    fn bad_cpu_lists_say_what_is_wrong() {
        for (text, why) in [
            ("", "empty"),
            ("x", "\"x\" is not a CPU number"),
            ("3-1", "range \"3-1\" runs backwards"),
            ("1,1", "CPU 1 is listed twice"),
            ("1024", "\"1024\" is not a CPU number"),
            ("0-", "\"\" is not a CPU number"),
        ] {
            let e = text.parse::<CpuPin>().unwrap_err();
            assert!(
                e.starts_with(why) && e.contains("CPUs 0..=1023"),
                "{text:?}: {e}"
            );
        }
    }

    fn server(io: &str) -> String {
        format!(
            "role = \"server\"\n[listen]\naddr = \":9999\"\n[network]\ninterface = \"eth0\"\n[network.ipv4]\n\
             addr = \"10.0.0.2:9999\"\nrouter_mac = \"02:00:00:00:00:01\"\n[transport]\nprotocol = \"kcp\"\n\
             [transport.kcp]\nkey = \"k\"\n[io]\n{io}\n"
        )
    }

    #[test]
    fn io_cpus_key_defaults_validates_and_round_trips() {
        let d = Config::from_toml_str(&server("")).unwrap().config;
        assert_eq!(d.io.cpus, CpuPin::Auto);
        let c = Config::from_toml_str(&server("cpus = \"1-2\""))
            .unwrap()
            .config;
        assert_eq!(c.io.cpus, CpuPin::Cpus(vec![1, 2]));
        let again = Config::from_toml_str(&c.to_toml_string()).unwrap().config;
        assert_eq!(again.io.cpus, c.io.cpus);
        let e = Config::from_toml_str(&server("cpus = \"2-1\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("io.cpus = \"2-1\": range \"2-1\" runs backwards"),
            "{e}"
        );
    }
}
