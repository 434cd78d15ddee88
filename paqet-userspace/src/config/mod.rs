//! Configuration: TOML schema under upstream paqet's key paths, upstream YAML import, validation.
//!
//! Every key, with its type, default, allowed values and meaning, is one row of the key table ([`schema()`],
//! `keys.rs`), the single source of defaults and ranges. Loading goes: text → `toml::Value` (YAML is
//! converted to the same tree) → schema walk over the table (unknown keys, wrong types) → serde [`raw`]
//! structs → defaults per role and value checks from the table → [`Config`]. Every problem is
//! collected and reported at once as `key.path = value: message`.

mod build;
mod keys;
mod noise;
pub mod raw;
mod read;
mod schema;
pub mod targets;
mod types;

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

pub use keys::{key_info, render_keys, schema, Allowed, Def, KeyInfo, KeyType, Scope, PORT_RANGE};
pub use noise::{NoiseConfig, NoiseKeyError, NoiseKeys, SecretSource, NOISE_MIN_MTU};
pub use types::{
    CpuPin, ForwardProtocol, HostPort, IoBackend, KcpMode, LogLevel, MacAddr, Role, BLOCK_MODES,
    TCP_FLAG_LETTERS,
};

pub use crate::proto::cc::CcAlgorithm;
pub use crate::proto::guard::{GuardBind, GuardFormat, ProbeResponse};

use schema::{Issues, Mode};

/// One configuration problem: the full key path, the offending value (if any) and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Full key path, with array indices (`socks5[1].listen`).
    pub key: String,
    /// The offending value as written (strings quoted), when there is one.
    pub value: Option<String>,
    /// What is wrong / what is allowed.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} = {}: {}", self.key, v, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("TOML syntax error: {0}")]
    TomlSyntax(String),
    /// The text is not valid YAML (or its top level is not a mapping).
    #[error("YAML syntax error: {0}")]
    YamlSyntax(String),
    /// The document parsed but has invalid or unknown keys/values; all problems are listed.
    #[error("invalid configuration ({} problem(s)):\n{}", .errors.len(), render_list(.errors))]
    Invalid {
        /// Every error found.
        errors: Vec<Issue>,
        /// Warnings found along the way.
        warnings: Vec<Issue>,
    },
}

fn render_list(items: &[Issue]) -> String {
    items
        .iter()
        .map(|i| format!("  - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Source format of a loaded configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// paqet-dp's TOML.
    Toml,
    /// upstream paqet's YAML, imported (guard defaults off).
    Yaml,
}

/// A successfully loaded configuration and the warnings raised while loading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// Non-fatal problems (ignored keys, odd values, a client with nothing to serve…).
    pub warnings: Vec<Issue>,
    /// What the source was.
    pub format: Format,
}

impl Loaded {
    /// Logs every warning through `tracing`.
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!("config: {w}");
        }
    }
}

/// One SOCKS5 listener (client). `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Socks5Listener {
    /// Listen address.
    pub listen: HostPort,
    /// RFC 1929 user ("" = none).
    pub username: String,
    /// RFC 1929 password ("" = none).
    pub password: String,
    /// `socks5[].allow_open_proxy`: start even on a non-loopback address without authentication.
    pub allow_open_proxy: bool,
}

impl Socks5Listener {
    /// Whether user/password authentication is required (either field non-empty, as upstream).
    pub fn auth_required(&self) -> bool {
        !self.username.is_empty() || !self.password.is_empty()
    }
}

/// One port forward (client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRule {
    /// Local listen address.
    pub listen: HostPort,
    /// Target, resolved by the server.
    pub target: HostPort,
    /// tcp or udp.
    pub protocol: ForwardProtocol,
}

/// Largest number of `[[reverse]]` entries (one PREVD carries them all).
pub const MAX_REVERSE: usize = crate::wire::header::MAX_REVERSE;

/// One reverse forward (client; paqet-dp addition): the server listens on `remote` and carries each
/// connection back through this client's session to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseRule {
    /// Label in logs and metrics (`reverse[].name`, default `protocol/remote`).
    pub name: String,
    /// Listen address on the server (an IP literal).
    pub remote: std::net::SocketAddr,
    /// Target on the client's side, resolved by the client.
    pub target: HostPort,
    /// tcp or udp.
    pub protocol: ForwardProtocol,
}

/// One HTTP proxy listener (client; paqet-dp addition). `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpListener {
    /// Listen address.
    pub listen: HostPort,
    /// Basic proxy-auth user (set together with `password`).
    pub username: Option<String>,
    /// Basic proxy-auth password.
    pub password: Option<String>,
    /// `http[].allow_open_proxy`: start even on a non-loopback address without authentication.
    pub allow_open_proxy: bool,
}

impl HttpListener {
    /// `(user, password)` when proxy authentication is configured.
    pub fn auth(&self) -> Option<(&str, &str)> {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some((u, p)),
            _ => None,
        }
    }
}

/// One address family of `network` (`ipv4` or `ipv6`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyConfig<A> {
    /// Local IP; `None` = take it from the interface at run time.
    pub ip: Option<A>,
    /// Local port; 0 = random per connection (client only).
    pub port: u16,
    /// Next-hop MAC; `None` = resolve from the kernel neighbour table at run time.
    pub router_mac: Option<MacAddr>,
}

/// `network.*`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Interface name.
    pub interface: String,
    /// Windows Npcap GUID (kept only for round-tripping; unused on Linux).
    pub guid: Option<String>,
    /// IPv4 family, if configured.
    pub ipv4: Option<FamilyConfig<Ipv4Addr>>,
    /// IPv6 family, if configured.
    pub ipv6: Option<FamilyConfig<Ipv6Addr>>,
    /// Flag strings (letters) this side sends with, cycled.
    pub local_flag: Vec<String>,
    /// Flag strings the client asks the server to use.
    pub remote_flag: Vec<String>,
    /// Capture buffer bytes.
    pub pcap_sockbuf: u32,
}

/// A stream/session limit: `None` = unlimited (`-1` in the file).
pub type Limit = Option<u32>;

/// `transport.kcp.*`. `Debug` redacts the key.
#[derive(Clone, PartialEq, Eq)]
pub struct KcpConfig {
    /// Preset.
    pub mode: KcpMode,
    /// Manual-mode nodelay.
    pub nodelay: i32,
    /// Manual-mode interval (ms).
    pub interval: i32,
    /// Manual-mode fast resend.
    pub resend: i32,
    /// Manual-mode no-congestion.
    pub nocongestion: i32,
    /// Manual-mode write delay.
    pub wdelay: bool,
    /// Manual-mode ACK no-delay.
    pub acknodelay: bool,
    /// MTU (bytes of TCP payload).
    pub mtu: u32,
    /// Receive window (packets): the fixed window, or where an auto-tuned one starts.
    pub rcvwnd: u32,
    /// `rcvwnd = "auto"` (the TOML default): the receive window grows from `rcvwnd` up to
    /// [`KcpConfig::max_wnd`].
    pub rcvwnd_auto: bool,
    /// Send window (packets): the fixed window, or where an auto-tuned one starts.
    pub sndwnd: u32,
    /// `sndwnd = "auto"` (the TOML default): the send window grows from `sndwnd` up to
    /// [`KcpConfig::max_wnd`].
    pub sndwnd_auto: bool,
    /// Memory cap of an auto-tuned window (bytes).
    pub window_mem: u32,
    /// FEC data shards.
    pub dshard: u32,
    /// FEC parity shards.
    pub pshard: u32,
    /// Block cipher name (parsed by the crypt module).
    pub block: String,
    /// Shared secret ("" only when block is none/null and guard is off).
    pub key: String,
    /// smux MaxReceiveBuffer.
    pub smuxbuf: u32,
    /// smux MaxStreamBuffer.
    pub streambuf: u32,
    /// smux keep-alive interval (s).
    pub smuxkalive: u32,
    /// smux keep-alive timeout (s).
    pub smuxktimeout: u32,
    /// Sender congestion control and pacing.
    pub cc: CcAlgorithm,
    /// Pacing rate of `cc = "fixed"` in bytes per second (`None` with any other `cc`).
    pub bandwidth: Option<u64>,
    /// Packet guard on.
    pub guard: bool,
    /// Guard format (`tag`, or the deprecated `cookie`).
    pub guard_format: GuardFormat,
    /// What the guard tag binds.
    pub guard_bind: GuardBind,
    /// Guard magic.
    pub guard_magic: [u8; 4],
    /// Guard window (s).
    pub guard_window: u32,
    /// Accepted previous windows.
    pub guard_skew: u32,
    /// Server: concurrent sessions.
    pub max_sessions: Limit,
    /// Server: concurrent streams in total.
    pub max_streams_total: Limit,
    /// Server: concurrent streams per session (≤ total).
    pub max_streams_per_session: Limit,
    /// Server: header read timeout (s).
    pub header_timeout: u32,
    /// Server: replay filter file ("" = in memory only).
    pub replay_filter: String,
    /// Server: replay filter horizon (days).
    pub replay_horizon: u32,
}

/// How a secret shows in `Debug` output: whether it is set, never its value.
fn redacted(s: &str) -> Redacted {
    Redacted(if s.is_empty() { "\"\"" } else { "<redacted>" })
}

/// Debug-prints its text verbatim (no quotes).
struct Redacted(&'static str);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Socks5Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socks5Listener")
            .field("listen", &self.listen)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("allow_open_proxy", &self.allow_open_proxy)
            .finish()
    }
}

impl fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpListener")
            .field("listen", &self.listen)
            .field("username", &self.username)
            .field("password", &self.password.as_deref().map(redacted))
            .field("allow_open_proxy", &self.allow_open_proxy)
            .finish()
    }
}

impl fmt::Debug for KcpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KcpConfig")
            .field("mode", &self.mode)
            .field("nodelay", &self.nodelay)
            .field("interval", &self.interval)
            .field("resend", &self.resend)
            .field("nocongestion", &self.nocongestion)
            .field("wdelay", &self.wdelay)
            .field("acknodelay", &self.acknodelay)
            .field("mtu", &self.mtu)
            .field("rcvwnd", &self.rcvwnd)
            .field("rcvwnd_auto", &self.rcvwnd_auto)
            .field("sndwnd", &self.sndwnd)
            .field("sndwnd_auto", &self.sndwnd_auto)
            .field("window_mem", &self.window_mem)
            .field("dshard", &self.dshard)
            .field("pshard", &self.pshard)
            .field("block", &self.block)
            .field("key", &redacted(&self.key))
            .field("smuxbuf", &self.smuxbuf)
            .field("streambuf", &self.streambuf)
            .field("smuxkalive", &self.smuxkalive)
            .field("smuxktimeout", &self.smuxktimeout)
            .field("cc", &self.cc)
            .field("bandwidth", &self.bandwidth)
            .field("guard", &self.guard)
            .field("guard_format", &self.guard_format)
            .field("guard_bind", &self.guard_bind)
            .field("guard_magic", &self.guard_magic)
            .field("guard_window", &self.guard_window)
            .field("guard_skew", &self.guard_skew)
            .field("max_sessions", &self.max_sessions)
            .field("max_streams_total", &self.max_streams_total)
            .field("max_streams_per_session", &self.max_streams_per_session)
            .field("header_timeout", &self.header_timeout)
            .finish()
    }
}

/// Largest KCP window (packets) the configuration accepts, and the ceiling of an auto-tuned window.
pub const MAX_WND: u32 = 32768;

impl KcpConfig {
    /// The largest size an auto-tuned window may reach (packets): `min(32768, window_mem / mtu)`, never
    /// below the starting value of a window that is auto-tuned.
    pub fn max_wnd(&self) -> u32 {
        let by_mem = self.window_mem / self.mtu.max(1);
        let mut max = by_mem.min(MAX_WND);
        if self.sndwnd_auto {
            max = max.max(self.sndwnd);
        }
        if self.rcvwnd_auto {
            max = max.max(self.rcvwnd);
        }
        max
    }
}

/// `transport.*`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// Parallel client connections.
    pub conn: u32,
    /// Client session rotation.
    pub rotate: RotateConfig,
    /// KCP/smux settings.
    pub kcp: KcpConfig,
    /// `[transport.noise]`: set exactly when `transport.kcp.block = "noise"`.
    pub noise: Option<NoiseConfig>,
}

/// `transport.rotate.*`: client session rotation (off when both triggers are 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotateConfig {
    /// Replace a session after about this many seconds (0 = never by age).
    pub after_secs: u32,
    /// Replace a session once it carried this many bytes (0 = never by volume).
    pub bytes: u64,
    /// Longest a replaced session keeps carrying its streams (s).
    pub drain_secs: u32,
}

impl RotateConfig {
    /// Whether any trigger is set.
    pub fn enabled(&self) -> bool {
        self.after_secs > 0 || self.bytes > 0
    }
}

/// `io.*`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoConfig {
    /// Backend choice.
    pub backend: IoBackend,
    /// Worker threads (0 = automatic).
    pub workers: u32,
    /// Where XDP workers pin themselves (`io.cpus`).
    pub cpus: CpuPin,
    /// XDP mode: the answer to frames without a tunnel datagram (`io.probe_response`).
    pub probe_response: ProbeResponse,
}

/// A validated configuration with every default applied.
/// Most servers a client may list (`server.addr` array / `[[server.servers]]`).
pub const MAX_SERVERS: usize = 32;
/// Largest `server.servers[].weight`.
pub const MAX_WEIGHT: u32 = 100;

/// One server of a client (`server.addr` entry or `[[server.servers]]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub addr: HostPort,
    /// Share of `transport.conn` sessions placed on it (relative to the other servers), 1..=100.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// client or server.
    pub role: Role,
    /// Log level.
    pub log_level: LogLevel,
    /// Server: `listen.addr`.
    pub listen: Option<HostPort>,
    /// Client: the first server (`server.addr`, or the first of its array / of `[[server.servers]]`).
    pub server: Option<HostPort>,
    /// Client: every server with its weight (one entry for a plain `server.addr`; empty on a server).
    pub servers: Vec<ServerEntry>,
    /// Server: `server.allow` / `server.deny` (off when both are empty).
    pub targets: targets::TargetPolicy,
    /// Client: SOCKS5 listeners.
    pub socks5: Vec<Socks5Listener>,
    /// Client: port forwards.
    pub forward: Vec<ForwardRule>,
    /// Client: HTTP proxy listeners.
    pub http: Vec<HttpListener>,
    /// Client: reverse forwards (`[[reverse]]`).
    pub reverse: Vec<ReverseRule>,
    /// Server: `server.reverse_allow` (empty: reverse forwards off).
    pub reverse_allow: Vec<std::net::SocketAddr>,
    /// Raw-packet network settings.
    pub network: NetworkConfig,
    /// Transport settings.
    pub transport: TransportConfig,
    /// `metrics.listen`.
    pub metrics_listen: Option<HostPort>,
    /// `debug.pprof` (always loopback).
    pub debug_pprof: Option<HostPort>,
    /// Packet I/O settings.
    pub io: IoConfig,
}

/// The six KCP knobs a mode resolves to (spec §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KcpTuning {
    /// ikcp nodelay.
    pub nodelay: i32,
    /// ikcp interval (ms).
    pub interval: i32,
    /// ikcp fast resend.
    pub resend: i32,
    /// ikcp no congestion window.
    pub nocongestion: i32,
    /// kcp-go write delay.
    pub wdelay: bool,
    /// kcp-go ACK no delay.
    pub acknodelay: bool,
}

impl Config {
    /// Parses and validates paqet-dp TOML (unknown keys are errors; guard defaults on).
    pub fn from_toml_str(text: &str) -> Result<Loaded, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::TomlSyntax(e.to_string()))?;
        Self::from_tree(&table, Mode::Strict, Format::Toml)
    }

    /// Imports upstream paqet YAML as upstream reads it: unknown keys are accepted (returned as warnings),
    /// Go zero values mean "unset", and the guard defaults off so the wire is exactly upstream's.
    pub fn from_yaml_str(text: &str) -> Result<Loaded, ConfigError> {
        let table = yaml_to_table(text)?;
        Self::from_tree(&table, Mode::Lenient, Format::Yaml)
    }

    /// Reads a file: `.yaml`/`.yml` → YAML import, `.toml` → TOML; anything else is sniffed (TOML first,
    /// then YAML when the text is not TOML but is a YAML mapping).
    pub fn load(path: impl AsRef<Path>) -> Result<Loaded, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("yaml") | Some("yml") => Self::from_yaml_str(&text),
            Some("toml") => Self::from_toml_str(&text),
            _ => match text.parse::<toml::Table>() {
                Ok(_) => Self::from_toml_str(&text),
                Err(toml_err) => match yaml_to_table(&text) {
                    Ok(_) => Self::from_yaml_str(&text),
                    Err(_) => Err(ConfigError::TomlSyntax(toml_err.to_string())),
                },
            },
        }
    }

    fn from_tree(table: &toml::Table, mode: Mode, format: Format) -> Result<Loaded, ConfigError> {
        let mut issues = Issues::default();
        let cleaned = schema::walk(table, mode, &mut issues);
        let raw: raw::RawConfig = match toml::Value::Table(cleaned).try_into() {
            Ok(r) => r,
            Err(e) => {
                // The walk guarantees shapes and types; this is a schema/struct mismatch in our code.
                issues.error("(document)", None, format!("internal schema mismatch: {e}"));
                raw::RawConfig::default()
            }
        };
        let config = build::build(&raw, mode, &mut issues);
        match config {
            Some(config) if issues.errors.is_empty() => Ok(Loaded {
                config,
                warnings: issues.warnings,
                format,
            }),
            _ => Err(ConfigError::Invalid {
                errors: issues.errors,
                warnings: issues.warnings,
            }),
        }
    }

    /// The configuration as paqet-dp TOML (every value explicit); [`Config::from_toml_str`] reads it back
    /// to an equal `Config`. Used by `paqet-dp config import`.
    pub fn to_toml_string(&self) -> String {
        let raw = build::to_raw(self);
        match toml::to_string(&raw) {
            Ok(s) => s,
            // Serializing plain structs of strings/ints/bools/arrays cannot fail; keep a readable fallback.
            Err(e) => format!("# cannot serialize configuration: {e}\n"),
        }
    }

    /// The resolved KCP knobs: the mode's preset, or the manual values.
    pub fn kcp_mode(&self) -> KcpTuning {
        let k = &self.transport.kcp;
        let preset = |nodelay, interval, wdelay, acknodelay| KcpTuning {
            nodelay,
            interval,
            resend: 2,
            nocongestion: 1,
            wdelay,
            acknodelay,
        };
        match k.mode {
            KcpMode::Normal => preset(0, 40, true, false),
            KcpMode::Fast => preset(0, 30, true, false),
            KcpMode::Fast2 => preset(1, 20, false, true),
            KcpMode::Fast3 => preset(1, 10, false, true),
            KcpMode::Manual => KcpTuning {
                nodelay: k.nodelay,
                interval: k.interval,
                resend: k.resend,
                nocongestion: k.nocongestion,
                wdelay: k.wdelay,
                acknodelay: k.acknodelay,
            },
        }
    }

    /// Whether the authenticated noise wire replaces kcp-go's crypto (`transport.kcp.block = "noise"`).
    pub fn is_noise(&self) -> bool {
        self.transport.noise.is_some()
    }

    /// Whether the config file itself holds a secret (`transport.kcp.key`, or an inline
    /// `transport.noise.private_key` / `psk`): such a file must not be readable by group or others.
    pub fn holds_inline_secret(&self) -> bool {
        !self.key().is_empty()
            || self
                .transport
                .noise
                .as_ref()
                .is_some_and(NoiseConfig::holds_inline_secret)
    }

    /// Whether this is a client.
    pub fn is_client(&self) -> bool {
        self.role == Role::Client
    }

    /// The local port of the fake TCP flow (the same for both families; 0 = random per connection).
    pub fn local_port(&self) -> u16 {
        self.network
            .ipv4
            .as_ref()
            .map(|f| f.port)
            .or(self.network.ipv6.as_ref().map(|f| f.port))
            .unwrap_or(0)
    }

    /// Client: the server endpoint as an IP socket address when `server.addr` is an IP literal
    /// (use [`HostPort::resolve`] on [`Config::server`] for host names).
    pub fn server_socket_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().and_then(HostPort::socket_addr)
    }

    /// Block cipher name for the crypt module.
    pub fn block(&self) -> &str {
        &self.transport.kcp.block
    }

    /// The shared key string (used as-is, never hex-decoded).
    pub fn key(&self) -> &str {
        &self.transport.kcp.key
    }

    /// FEC shards `(data, parity)` when FEC is on (both > 0).
    pub fn fec(&self) -> Option<(u32, u32)> {
        let k = &self.transport.kcp;
        (k.dshard > 0 && k.pshard > 0).then_some((k.dshard, k.pshard))
    }

    /// Flag strings this side sends with.
    pub fn local_flags(&self) -> &[String] {
        &self.network.local_flag
    }

    /// Flag strings the client asks the server to use.
    pub fn remote_flags(&self) -> &[String] {
        &self.network.remote_flag
    }

    /// smux keep-alive interval.
    pub fn smux_keepalive(&self) -> Duration {
        Duration::from_secs(u64::from(self.transport.kcp.smuxkalive))
    }

    /// smux keep-alive timeout.
    pub fn smux_keepalive_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.transport.kcp.smuxktimeout))
    }

    /// Server: header read timeout.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.transport.kcp.header_timeout))
    }

    /// Guard window length.
    pub fn guard_window(&self) -> Duration {
        Duration::from_secs(u64::from(self.transport.kcp.guard_window))
    }

    /// Whether the client has anything to serve (SOCKS5, forward or HTTP listeners).
    pub fn has_front_ends(&self) -> bool {
        !(self.socks5.is_empty()
            && self.forward.is_empty()
            && self.http.is_empty()
            && self.reverse.is_empty())
    }
}

/// A file holding the shared key is readable by its group or by others.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} holds {what} but is readable by group/others (mode {mode:04o}): run `chmod 600 {path}`"
)]
pub struct SecretFileMode {
    /// The file.
    pub path: String,
    /// What it holds (`transport.kcp.key`, `the key given by --key-file`).
    pub what: &'static str,
    /// Its permission bits.
    pub mode: u32,
}

/// Checks that a file holding the key is not group/world-readable (mode `& 0o044 == 0`). A file whose
/// metadata cannot be read passes (reading it failed or will fail with its own error).
pub fn check_secret_file(path: &Path, what: &'static str) -> Result<(), SecretFileMode> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o044 == 0 {
        return Ok(());
    }
    Err(SecretFileMode {
        path: path.display().to_string(),
        what,
        mode,
    })
}

/// Parses YAML into the same tree TOML produces (nulls dropped = unset, merge keys applied).
fn yaml_to_table(text: &str) -> Result<toml::Table, ConfigError> {
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| ConfigError::YamlSyntax(e.to_string()))?;
    value
        .apply_merge()
        .map_err(|e| ConfigError::YamlSyntax(e.to_string()))?;
    match value {
        serde_yaml::Value::Null => Ok(toml::Table::new()),
        serde_yaml::Value::Mapping(_) => match yaml_to_toml(value) {
            Some(toml::Value::Table(t)) => Ok(t),
            _ => Ok(toml::Table::new()),
        },
        _ => Err(ConfigError::YamlSyntax(
            "the top level must be a mapping of keys".to_string(),
        )),
    }
}

fn yaml_scalar_key(k: &serde_yaml::Value) -> Option<String> {
    match k {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn yaml_to_toml(v: serde_yaml::Value) -> Option<toml::Value> {
    use serde_yaml::Value as Y;
    Some(match v {
        Y::Null => return None,
        Y::Bool(b) => toml::Value::Boolean(b),
        Y::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => match n.as_f64() {
                Some(f) => toml::Value::Float(f),
                None => toml::Value::String(n.to_string()),
            },
        },
        Y::String(s) => toml::Value::String(s),
        Y::Sequence(items) => {
            toml::Value::Array(items.into_iter().filter_map(yaml_to_toml).collect())
        }
        Y::Mapping(m) => {
            let mut t = toml::Table::new();
            for (k, v) in m {
                if let (Some(k), Some(v)) = (yaml_scalar_key(&k), yaml_to_toml(v)) {
                    t.insert(k, v);
                }
            }
            toml::Value::Table(t)
        }
        Y::Tagged(tagged) => return yaml_to_toml(tagged.value),
    })
}

#[cfg(test)]
mod tests;
