//! serde structs mirroring the file's key paths one to one. Every field is optional: defaults and checks
//! are applied afterwards (`build.rs`), and `Config::to_toml_string` serializes through these too.
//! Integers are `i64` so that out-of-range values reach validation instead of failing deserialization.

use serde::{Deserialize, Serialize};

/// A value that may be written as an integer or as a string (`sndwnd = "auto"`, `bandwidth = "100mbit"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    /// An integer as written.
    Int(i64),
    /// A string as written.
    Str(String),
}

impl std::fmt::Display for IntOrString {
    /// As the file writes it (strings quoted), for messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IntOrString::Int(i) => write!(f, "{i}"),
            IntOrString::Str(s) => write!(f, "{}", toml::Value::String(s.clone())),
        }
    }
}

/// Top level of the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<RawLog>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<RawAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<RawAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<RawNetwork>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<RawTransport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<RawMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug: Option<RawDebug>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io: Option<RawIo>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub socks5: Vec<RawSocks5>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<RawForward>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<RawHttp>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reverse: Vec<RawReverse>,
}

/// `[[reverse]]` (paqet-dp: a listener on the server carried back to a target on the client's side).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawReverse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `[log]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawLog {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// `[listen]` / `[server]` (`allow`/`deny` are server keys of `[server]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawAddr {
    /// `listen.addr` (a string), or `server.addr`: a string or (several servers) an array of strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<OneOrMany>,
    /// Client: `[[server.servers]]` (several servers with weights; paqet-dp).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<RawServer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse_allow: Option<Vec<String>>,
}

/// A string or an array of strings (`server.addr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The single string (`None` for an array).
    pub fn one(&self) -> Option<&String> {
        match self {
            OneOrMany::One(s) => Some(s),
            OneOrMany::Many(_) => None,
        }
    }
}

impl RawAddr {
    /// `addr` when it is a single string.
    pub fn addr_one(&self) -> Option<&String> {
        self.addr.as_ref().and_then(OneOrMany::one)
    }
}

/// `[[server.servers]]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawServer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// `[[socks5]]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawSocks5 {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_open_proxy: Option<bool>,
}

/// `[[forward]]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawForward {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `[[http]]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawHttp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_open_proxy: Option<bool>,
}

/// `[network]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawNetwork {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<RawFamily>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<RawFamily>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<RawTcp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pcap: Option<RawPcap>,
}

/// `[network.ipv4]` / `[network.ipv6]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawFamily {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_mac: Option<String>,
}

/// `[network.tcp]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawTcp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_flag: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_flag: Option<Vec<String>>,
}

/// `[network.pcap]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawPcap {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockbuf: Option<i64>,
}

/// `[transport]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawTransport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotate: Option<RawRotate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kcp: Option<RawKcp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<RawNoise>,
}

/// `[transport.noise]` (paqet-dp's authenticated wire, `block = "noise"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawNoise {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_public_keys: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
}

/// `[transport.rotate]` (paqet-dp: client session rotation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawRotate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<i64>,
}

/// `[transport.kcp]` (upstream keys, then paqet-dp's congestion-control, guard and limit keys).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawKcp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodelay: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resend: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nocongestion: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wdelay: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknodelay: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcvwnd: Option<IntOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sndwnd: Option<IntOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dshard: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pshard: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smuxbuf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streambuf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smuxkalive: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smuxktimeout: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<IntOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_mem: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_bind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_magic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_window: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_skew: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_streams_total: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_streams_per_session: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_filter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_horizon: Option<i64>,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawMetrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// `[debug]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawDebug {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pprof: Option<String>,
}

/// `[io]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RawIo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_response: Option<String>,
}
